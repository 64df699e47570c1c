"""Triton (GPU) block-sparse kernel: interpreter vs reference through the shared helper, and
lowering for CUDA with `jax.export` on CPU."""

import functools

import jax
import jax.numpy as jnp
import pytest

from attnjax import masks
from attnjax.ops.softmax import api, pallas
from attnjax.ops.softmax.pallas import mask_info
from kernels_pallas.block_sparse import gpu
from tests.ops.softmax import test_dot_product_attention as shared


@pytest.fixture
def gpu_kernel_interpreted(monkeypatch):
  """Routes impl='pallas_interpret' to the Triton kernel for the duration of a test."""
  interpreted = functools.partial(pallas.attention, interpret=True, kernel="gpu")
  monkeypatch.setitem(api.IMPLS, "pallas_interpret", interpreted)


@pytest.mark.parametrize("mask_name, config", shared.MASK_CONFIG_PAIRS[::2])
def test_gpu_kernel_matches_reference(gpu_kernel_interpreted, mask_name, config):
  shared.test_matches_reference("pallas_interpret", mask_name, config)


def test_gpu_kernel_decoding_and_fully_masked_rows(gpu_kernel_interpreted):
  shared.test_decoding_and_cross_attention_with_q_offset("pallas_interpret")
  shared.test_fully_masked_rows_give_zeros_and_finite_gradients("pallas_interpret")


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa"])
def test_gpu_kernel_lowers_for_cuda(dtype, kv_heads):
  batch, seq, heads, head_dim = 1, 320, 4, 64
  info = mask_info(masks.causal() & masks.sliding_window(100), seq, seq, 64, 32, 0)
  q = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((batch, seq, kv_heads, head_dim), dtype)
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  sinks = jax.ShapeDtypeStruct((heads,), jnp.float32)

  def attend(q, k, v, ids, sinks):
    return gpu.block_sparse_attention(
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


def test_gpu_kernel_rejects_non_power_of_two_blocks():
  info = mask_info(masks.causal(), 48, 48, 24, 24, 0)
  q = jnp.ones((1, 48, 1, 16))
  with pytest.raises(ValueError, match="power of two"):
    gpu.block_sparse_attention(q, q, q, info, scale=1.0, interpret=True)
