"""The Triton GPU block-sparse kernel: lowering for CUDA with `jax.export` on CPU, and its
power-of-two block rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attnjax import masks
from attnjax.ops.softmax.pallas import mask_info
from kernels_pallas.block_sparse import BlockSizes
from kernels_pallas.block_sparse.gpu import block_sparse_attention, check_block_sizes


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa"])
def test_lowers_for_cuda_forward_and_gradient(dtype, kv_heads):
  batch, seq, heads, head_dim = 1, 320, 4, 64
  info = mask_info(masks.causal() & masks.sliding_window(100), seq, seq, 64, 32, 0)
  q = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((batch, seq, kv_heads, head_dim), dtype)
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  sinks = jax.ShapeDtypeStruct((heads,), jnp.float32)

  def attend(q, k, v, ids, sinks):
    return block_sparse_attention(
      q, k, v, info, scale=0.125, segment_ids=(ids, ids), sinks=sinks, softcap=30.0
    )

  def grads(q, k, v, ids, sinks):
    loss = lambda q, k, v, s: attend(q, k, v, ids, s)[0].astype(jnp.float32).sum()  # noqa: E731
    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sinks)

  # Triton custom calls carry no serialization-compatibility guarantee; lowering is the check.
  triton = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  for fn, kernels in ((attend, 1), (grads, 3)):
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=triton)(
      q, kv, kv, ids, sinks
    )
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") >= kernels


def test_blocks_must_be_powers_of_two():
  with pytest.raises(ValueError, match="block_kv=24 must be a power of two >= 1"):
    check_block_sizes(BlockSizes(16, 24), interpret=True)
  with pytest.raises(ValueError, match="block_q=8 must be a power of two >= 16"):
    check_block_sizes(BlockSizes(8, 16), interpret=False)
  check_block_sizes(BlockSizes(8, 4), interpret=True)
  info = mask_info(masks.causal(), 48, 48, 24, 24, 0)
  q = jnp.ones((1, 48, 1, 16))
  with pytest.raises(ValueError, match="power of two"):
    block_sparse_attention(q, q, q, info, scale=1.0, interpret=True)
