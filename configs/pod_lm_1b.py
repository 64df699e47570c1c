"""A 1.07B-parameter decoder LM for a 256-chip TPU pod: data x fsdp x tensor x seq = 2x16x4x2.

    python train.py --config=configs/pod_lm_1b.py --workdir=gs://BUCKET/lm1b \
      --config.data.text.source_dir=/path/to/corpus --config.data.text.data_dir=/path/to/tfds

Run it on every host of the slice (jax.distributed.initialize finds the TPU pod by itself;
set `--config.distributed.initialize=True`). Hardware: the mesh as written needs 256 chips,
but it does not fit a v5e-256 (below); 128 v5p chips (v5p:4x4x8, `--config.mesh.shape.data=-1`)
hold it. Model: 16 layers, width 2048, 16 query / 8 kv heads of 128, SwiGLU 8192, vocab 32768,
bf16 activations, sequences of 4096, global batch 256 (1M tokens per step), 20k steps (~20B
tokens).

Compiler figures, never run on a TPU: the train step compiled by XLA:TPU and Mosaic for
compile-only devices on a CPU host (libtpu 0.0.42.1, jax 0.10.2):

    python train.py --config=configs/pod_lm_1b.py --workdir=/tmp/lm1b --compile_topology=v5e:16x16
    python train.py --config=configs/pod_lm_1b.py --workdir=/tmp/lm1b --compile_topology=v5p:4x4x8 \
      --config.mesh.shape.data=-1

v5e:16x16 (256 chips, data 2 x fsdp 16 x tensor 4 x seq 2, 8 x 2048 tokens per chip) does NOT
fit: parameters and AdamW state take 192 MiB per chip (201,377,292 bytes), but the compiler
needs 24.28G of HBM per chip where it allows 15.75G (of 16.0 GiB); with XLA attention
(`impl="xla"`) instead of the Mosaic kernels it needs 16.91G. Beyond the state, that is the
step's temporaries: activations kept for the backward pass (the model has no
rematerialization). Compiling took 14 min on a 2-core host shared with other jobs.
v5p:4x4x8 (128 chips, data 1 x fsdp 16 x tensor 4 x seq 2, 16 x 2048 tokens per chip) fits:
per chip 192.55 MiB of arguments (parameters, AdamW state, batch), 53.06 GiB of temporaries,
53.25 GiB in all (outputs reuse the donated state) of 95.93 GiB HBM; 7.64e15 FLOP per step
(5.96e13 per chip, close to 6 x 1.07e9 x 2^20 = 6.7e15 plus causal attention); collectives in
the program: 356 all-gather, 53 reduce-scatter, 128 all-reduce, 108 collective-permute (the
ring); 320 Mosaic kernels. Compiling took 22 min on the same shared host.

Expected time (not measured): on v5p:4x4x8, 5.96e13 FLOP per chip per step at 40% of 459
TFLOP/s is 0.32 s per step, about 1.8 hours for 20k steps.
Expected result (not measured): held-out loss well below 1 nat/byte.

`tests/configs/test_configs.py` builds it abstractly and checks every parameter's sharding on
a simulated 256-device mesh and the per-device memory: 64 MiB of float32 parameters and 192 MiB
with the AdamW state per chip (every weight split 64 ways by fsdp x tensor, replicated over data
x seq).
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
