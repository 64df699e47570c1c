"""Every sequence-parallel strategy compiles for TPU v5e inside a DecoderLM, forward and
backward, with the Mosaic kernel per shard: a seq axis of 4 compile-only devices (libtpu);
and data-parallel mixers (no sequence split) compile with their kernels per batch shard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from attnjax import aot, nn
from attnjax.nn.seq_parallel import SeqParallel

if not aot.libtpu_installed():
  pytest.skip("pip install -r requirements-compile.txt", allow_module_level=True)

pytestmark = pytest.mark.tpu_compile

SEQ_LEN, VOCAB = 1024, 128
# strategy -> (layer pattern, SeqParallel strategies)
CASES = {
  "ring": ("softmax", {"softmax": "ring"}),
  "allgather": ("softmax", {"softmax": "allgather"}),
  "ulysses": ("softmax", {"softmax": "ulysses"}),
  "lasp2": ("linear", {"linear": "lasp2"}),
  "zeco": ("linear", {"linear": "zeco"}),
  "lasp2h": ("softmax,linear", {"softmax": "lasp2h", "linear": "lasp2h"}),
}


def _mesh(data: int, seq: int) -> jax.sharding.Mesh:
  devices = np.array(aot.tpu_devices("v5e:2x2")).reshape(data, seq)
  auto = jax.sharding.AxisType.Auto
  return jax.sharding.Mesh(devices, ("data", "seq"), axis_types=(auto, auto))


def _compile_train_step(pattern: str, strategies: dict, data: int = 1, mixer_options=None):
  """A bfloat16 DecoderLM's loss and gradients on `[data, SEQ_LEN]` tokens over 4 devices:
  the batch split over `data`, the sequence over the other `4 // data`."""
  mesh = _mesh(data, 4 // data)

  def build():
    return nn.DecoderLM(
      vocab_size=VOCAB,
      embed_dim=256,
      depth=len(pattern.split(",")),
      num_heads=4,
      num_kv_heads=2,
      head_dim=128,
      mlp_dim=0,
      layer_pattern=pattern,
      dtype=jnp.bfloat16,
      seq_parallel=SeqParallel(mesh, **strategies, batch_axes=("data",)),
      mixer_options=mixer_options,
      rngs=nnx.Rngs(0),
    )

  graph, params = nnx.split(nnx.eval_shape(build))
  params = aot.abstract(params, NamedSharding(mesh, PartitionSpec()))
  tokens = jax.ShapeDtypeStruct(
    (data, SEQ_LEN), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec("data", "seq"))
  )

  def loss(params, tokens):
    log_probs = jax.nn.log_softmax(nnx.merge(graph, params)(tokens))
    return -jnp.mean(jnp.take_along_axis(log_probs, tokens[..., None], axis=-1))

  return jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()


@pytest.mark.parametrize("strategy", list(CASES))
def test_strategy_compiles_for_tpu_with_the_kernel_per_shard(strategy):
  calls = aot.custom_calls(_compile_train_step(*CASES[strategy]))
  assert calls["tpu_custom_call"] > 0, calls


@pytest.mark.parametrize(
  "pattern, mixer_options",
  [("diffqkv", None), ("neighborhood", {"neighborhood": {"kernel_size": 127}})],
)
def test_data_parallel_mixers_compile_for_tpu_with_the_kernel_per_shard(pattern, mixer_options):
  """The batch over 4 devices, no sequence split: the ops run per shard, where Mosaic
  compiles (a kernel on GSPMD-partitioned global arrays does not)."""
  calls = aot.custom_calls(_compile_train_step(pattern, {}, data=4, mixer_options=mixer_options))
  assert calls["tpu_custom_call"] > 0, calls
