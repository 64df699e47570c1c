"""A 1.07B-parameter decoder LM for a 256-chip TPU pod: data x fsdp x tensor x seq = 2x16x4x2.

    python train.py --config=configs/pod_lm_1b.py --workdir=gs://BUCKET/lm1b \
      --config.data.text.source_dir=/path/to/corpus --config.data.text.data_dir=/path/to/tfds

Run it on every host of the slice (jax.distributed.initialize finds the TPU pod by itself;
set `--config.distributed.initialize=True`). Hardware: 256 TPU chips (e.g. v5e-256).
Model: 16 layers, width 2048, 16 query / 8 kv heads of 128, SwiGLU 8192, vocab 32768, bf16
activations, sequences of 4096, global batch 256 (1M tokens per step), 20k steps (~20B tokens).
Expected time (an estimate, never measured): 6 * 1.07e9 * 2.1e10 FLOP at ~40% of
256 x 197 TFLOP/s is about 2 hours; expected result: held-out loss well below 1 nat/byte.

It cannot run here; `tests/configs/test_pod_config.py` builds it abstractly, checks every
parameter's sharding on a simulated 256-device mesh and the per-device memory: 64 MiB of
float32 parameters and 192 MiB with the AdamW state per chip (every weight split 64 ways by
fsdp x tensor, replicated over data x seq).
"""

from attnjax.training.config import default_config, lock

MESH = {"data": 2, "fsdp": 16, "tensor": 4, "seq": 2}


def get_config():
  config = default_config()
  config.model.vocab_size = 32768
  config.model.embed_dim = 2048
  config.model.depth = 16
  config.model.num_heads = 16
  config.model.num_kv_heads = 8
  config.model.head_dim = 128
  config.model.mlp_dim = 8192
  config.model.layer_pattern = "softmax"
  config.model.tie_embeddings = True
  config.model.dtype = "bfloat16"
  config.data.kind = "text"
  config.data.text.seq_len = 4096
  config.train.steps = 20_000
  config.train.batch_size = 256
  config.train.learning_rate = 3e-4
  config.train.warmup_steps = 2000
  config.train.log_every = 50
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  config.eval.batch_size = 256
  config.eval.num_batches = 8
  config.eval.evaluators = ("loss", "length_extrapolation")
  config.mesh.shape.update(MESH)
  config.mesh.rules = (
    ("batch", ("data", "fsdp")),
    ("seq", "seq"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
  )
  return lock(config)
