"""The experiment config schema: defaults, locking, validation before any compilation, and the
copy of its config a run keeps in `workdir/config.json`.

Every config file starts from `default_config()` (the full schema), sets its fields and
returns `lock(config)`: a locked ConfigDict rejects unknown keys (`--config.modle.depth=2`
fails at flag parsing, naming the key) and type changes. `validate(config)` then checks
values, naming the offending key, before anything is traced or compiled.

Sequence parallelism: with `mesh.shape.seq > 1` every mixer's attention op runs with the
sequence split over the mesh axis `seq` (`attnjax.parallel.sequence_parallel`), using
`parallel.softmax` ("ring", "allgather", "ulysses"; "lasp2h" is "allgather") in softmax layers
and `parallel.linear` ("lasp2", "zeco"; "lasp2h" is "lasp2") in linear layers, e.g.
`--config.mesh.shape.seq=4 --config.parallel.softmax=allgather`. Data batches are split over
`seq` by the `seq` rule of `mesh.rules`; the parameters and checkpoints do not change.
"""

from __future__ import annotations

import json
import os

import ml_collections

from attnjax import registry
from attnjax.parallel import api as parallel_api

# Logical axis -> mesh axes (None: replicated). FSDP shards the embedding dimension of every
# weight; tensor parallelism shards heads and MLP units; batches split over data x fsdp and
# their sequence dimension over seq.
DEFAULT_RULES = (
  ("batch", ("data", "fsdp")),
  ("seq", "seq"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("vocab", "tensor"),
)
MESH_AXES = ("data", "fsdp", "tensor", "seq")
DTYPES = ("float32", "bfloat16")


def default_config() -> ml_collections.ConfigDict:
  """Every key a config may set, with defaults for a tiny MQAR softmax run."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.kind = "lm"
  c.model.vocab_size = 256
  c.model.embed_dim = 64
  c.model.depth = 2
  c.model.num_heads = 2
  c.model.num_kv_heads = 0  # 0: same as num_heads
  c.model.head_dim = 0  # 0: embed_dim // num_heads
  c.model.mlp_dim = 0  # 0: no MLP (Zoology's MQAR models)
  c.model.layer_pattern = "softmax"
  c.model.mixer_options = ml_collections.ConfigDict()  # variant name -> keyword options
  c.model.tie_embeddings = True
  c.model.dtype = "float32"

  c.data = ml_collections.ConfigDict()
  c.data.kind = "mqar"
  c.data.mqar = ml_collections.ConfigDict(
    dict(seq_len=64, num_pairs=4, vocab_size=256, power_a=0.01)
  )
  c.data.passkey = ml_collections.ConfigDict(dict(seq_len=256, passkey_len=5, vocab_size=64))
  c.data.selective_copy = ml_collections.ConfigDict(dict(seq_len=128, num_tokens=8, vocab_size=16))
  # source_dir "": the bundled corpus; data_dir "": ~/.cache/attnjax/tfds.
  c.data.text = ml_collections.ConfigDict(dict(data_dir="", source_dir="", seq_len=256))

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 32  # global, over all processes
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 50
  c.train.min_lr_ratio = 0.1  # cosine decays to learning_rate * min_lr_ratio
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.98
  c.train.grad_clip = 1.0
  c.train.log_every = 20
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 3

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.num_batches = 4
  c.eval.evaluators = ("loss",)  # see attnjax.training.evaluate.EVALUATORS
  c.eval.passkey_lengths = (128, 256, 512)
  c.eval.extrapolation_factor = 4

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, seq=1))
  c.mesh.rules = DEFAULT_RULES

  # Sequence-parallel strategy per mixer family, used when mesh.shape.seq > 1.
  c.parallel = ml_collections.ConfigDict(dict(softmax="ring", linear="lasp2"))

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False  # True, or set JAX_COORDINATOR_ADDRESS
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  return c


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks `config` (unknown keys raise) and returns it."""
  config.lock()
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises `ValueError` naming the key whose value is invalid."""
  from attnjax.training import build  # tables of model and data kinds

  _choice(config, "model.kind", tuple(build.MODELS))
  _choice(config, "data.kind", tuple(build.DATASETS))
  _choice(config, "model.dtype", DTYPES)
  _choice(config, "parallel.softmax", tuple(parallel_api.SOFTMAX_STRATEGIES))
  _choice(config, "parallel.linear", tuple(parallel_api.LINEAR_STRATEGIES))
  for key in ("model.vocab_size", "model.embed_dim", "model.depth", "model.num_heads"):
    _positive(config, key)
  for key in ("model.num_kv_heads", "model.head_dim", "model.mlp_dim"):
    _non_negative(config, key)
  for key in ("train.steps", "train.batch_size", "train.log_every", "train.eval_every"):
    _positive(config, key)
  for key in ("train.checkpoint_every", "train.keep_checkpoints", "eval.batch_size"):
    _positive(config, key)
  for key in ("eval.num_batches", "eval.extrapolation_factor"):
    _positive(config, key)
  for key in ("train.warmup_steps", "train.weight_decay", "train.grad_clip"):
    _non_negative(config, key)
  if not config.train.learning_rate > 0:
    raise ValueError(f"train.learning_rate must be positive, got {config.train.learning_rate}")
  if not 0 <= config.train.min_lr_ratio <= 1:
    raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {config.train.min_lr_ratio}")
  known = registry.names()
  for name in config.model.mixer_options:
    if name not in known:
      raise ValueError(f"model.mixer_options.{name}: unknown attention variant; known: {known}")
  if set(config.mesh.shape) != set(MESH_AXES):
    raise ValueError(f"mesh.shape must name the axes {MESH_AXES}, got {dict(config.mesh.shape)}")
  for axis, size in config.mesh.shape.items():
    if size != -1 and size < 1:
      raise ValueError(f"mesh.shape.{axis} must be positive or -1 (fill), got {size}")
  for logical, mesh_axes in config.mesh.rules:
    for axis in (mesh_axes,) if isinstance(mesh_axes, str | type(None)) else mesh_axes:
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"mesh.rules maps {logical!r} to unknown mesh axis {axis!r}")
  from attnjax.training import evaluate

  for name in config.eval.evaluators:
    if name not in evaluate.EVALUATORS:
      raise ValueError(
        f"eval.evaluators: unknown evaluator {name!r}; known: {sorted(evaluate.EVALUATORS)}"
      )
  build.DATASETS[config.data.kind].validate(config)


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes `config` to `workdir/config.json`."""
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def load(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in `workdir/config.json`, locked (JSON lists back to tuples)."""
  with open(os.path.join(workdir, "config.json")) as f:
    return lock(ml_collections.ConfigDict(_tuples(json.load(f))))


def _tuples(value):
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _get(config, key: str):
  value = config
  for part in key.split("."):
    value = value[part]
  return value


def _choice(config, key: str, choices) -> None:
  if _get(config, key) not in choices:
    raise ValueError(f"{key} must be one of {sorted(choices)}, got {_get(config, key)!r}")


def _positive(config, key: str) -> None:
  if not _get(config, key) > 0:
    raise ValueError(f"{key} must be positive, got {_get(config, key)!r}")


def _non_negative(config, key: str) -> None:
  if not _get(config, key) >= 0:
    raise ValueError(f"{key} must be >= 0, got {_get(config, key)!r}")
