"""MQAR (Zoology's multi-query associative recall) with any registered attention variant.

    python train.py --config=configs/mqar.py:softmax --workdir=/tmp/mqar

Presets: every registered variant with a causal form puts that variant in both layers (asked
for its causal form where it has both, with the options of `VARIANT_OPTIONS`); `hybrid_<name>`
alternates `<name>` and `softmax` layers. Task: seq_len
64, 4 key-value pairs, vocabulary 256; a 2-layer, width-64 model without MLP (Zoology's MQAR
models), 800 steps of 64 sequences.
Hardware and time: a 2-core CPU shared with other jobs; the `softmax` preset took 85 s wall
(78 s of training) when measured.
Expected result: `softmax` prints a final eval accuracy >= 0.9 (measured: 1.000 on 1,024
held-out answers; 0.996 already at step 400). `sliding_window` (window 8) cannot see keys
outside its window and stays far lower.

Sequence parallelism: split each sequence over 4 devices (here 8 simulated CPU devices, data=2
x seq=4), ring attention in softmax layers and LASP-2 in linear layers:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python train.py \
      --config=configs/mqar.py:hybrid_gla --config.model.num_heads=4 \
      --config.mesh.shape.data=2 --config.mesh.shape.seq=4 \
      --config.parallel.softmax=ring --config.parallel.linear=lasp2 --workdir=/tmp/mqar_seq4

The losses equal those of the same run with `--config.mesh.shape.seq=1` up to float32
rounding (`tests/parallel/test_seq_parallel_train.py`).
"""

from attnjax import registry
from attnjax.training.config import default_config, lock

# Options of variants whose defaults do not suit 64-token sequences.
VARIANT_OPTIONS = {
  "sliding_window": {"window": 8},
  "chunked": {"chunk_size": 16},
  "prefix_lm": {"prefix_len": 8},
  "sinks": {"num_sink_tokens": 1},
  "softplus": {"train_len": 64},
  "diffqkv": {"num_k_heads": 1, "q_aug_dim": 64},
  "cca": {"group_size": 4, "window": 8},
}
HYBRID_PREFIX = "hybrid_"


def causal_presets() -> list[str]:
  """The registered variants with a causal form: the presets of this config."""
  return [n for n in registry.names() if registry.get(n).capabilities.causal]


def get_config(preset: str = "softmax"):
  config = default_config()
  config.train.steps = 800
  config.train.batch_size = 64
  config.train.learning_rate = 3e-3
  config.train.warmup_steps = 50
  config.train.log_every = 20
  config.train.eval_every = 200
  config.train.checkpoint_every = 200
  config.eval.evaluators = ("loss", "mqar_accuracy")
  name = preset.removeprefix(HYBRID_PREFIX)
  if name not in registry.names():
    raise ValueError(
      f"unknown preset {preset!r}; presets: the registered variants {registry.names()}, "
      f"each also as {HYBRID_PREFIX}<name>"
    )
  causal_options = registry.get(name).capabilities.causal_options()
  if causal_options is None:
    raise ValueError(f"variant {name!r} is bidirectional and cannot be trained as a causal LM")
  config.model.layer_pattern = f"{name},softmax" if preset.startswith(HYBRID_PREFIX) else name
  options = {**causal_options, **VARIANT_OPTIONS.get(name, {})}
  if options:
    config.model.mixer_options = {name: options}
  return lock(config)
