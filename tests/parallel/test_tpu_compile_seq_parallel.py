"""Every sequence-parallel strategy compiles for TPU v5e inside a DecoderLM, forward and
backward, with the Mosaic kernel per shard: a seq axis of 4 compile-only devices (libtpu)."""

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


def _seq_mesh() -> jax.sharding.Mesh:
  devices = np.array(aot.tpu_devices("v5e:2x2"))
  return jax.sharding.Mesh(devices, ("seq",), axis_types=(jax.sharding.AxisType.Auto,))


def _compile_train_step(pattern: str, strategies: dict):
  """A bfloat16 DecoderLM's loss and gradients on `[1, SEQ_LEN]` tokens split over `seq`."""
  mesh = _seq_mesh()

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
      seq_parallel=SeqParallel(mesh, **strategies),
      rngs=nnx.Rngs(0),
    )

  graph, params = nnx.split(nnx.eval_shape(build))
  params = aot.abstract(params, NamedSharding(mesh, PartitionSpec()))
  tokens = jax.ShapeDtypeStruct(
    (1, SEQ_LEN), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec(None, "seq"))
  )

  def loss(params, tokens):
    log_probs = jax.nn.log_softmax(nnx.merge(graph, params)(tokens))
    return -jnp.mean(jnp.take_along_axis(log_probs, tokens[..., None], axis=-1))

  return jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()


@pytest.mark.parametrize("strategy", list(CASES))
def test_strategy_compiles_for_tpu_with_the_kernel_per_shard(strategy):
  calls = aot.custom_calls(_compile_train_step(*CASES[strategy]))
  assert calls["tpu_custom_call"] > 0, calls
