"""The Mosaic delta-rule kernels compiled for TPU v4 and v5e on compile-only devices (the real
XLA:TPU and Mosaic passes, each chip's VMEM), forward and gradient, through the op's
`impl="pallas"`; every generation's VMEM holds the kernels' limits at T=8192, head_dim 256."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

import attnjax as aj
from attnjax import aot
from attnjax.ops.delta import chunk
from kernels_pallas.delta_rule import tpu
from tests.kernels.chunked_linear.test_chunked_linear_tpu import pallas_calls

pytestmark = [
  pytest.mark.tpu_compile,
  pytest.mark.skipif(not aot.libtpu_installed(), reason="pip install -r requirements-compile.txt"),
]


def op_shapes(dtype, seq=256, heads=4, kv_heads=2, head_dim=128):
  """(q, k, v, beta, log_decay) of the public op."""
  per_token = jax.ShapeDtypeStruct((1, seq, heads), jnp.float32)
  return (
    jax.ShapeDtypeStruct((1, seq, heads, head_dim), dtype),
    jax.ShapeDtypeStruct((1, seq, kv_heads, head_dim), dtype),
    jax.ShapeDtypeStruct((1, seq, kv_heads, head_dim), dtype),
    per_token,
    per_token,
  )


def op_forward(q, k, v, beta, log_decay):
  return aj.ops.delta_rule_attention(
    q, k, v, beta, log_decay=log_decay, return_final_state=True, impl="pallas"
  )


@pytest.mark.parametrize("generation", ["v4", "v5e"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_compiles_forward_and_gradient(generation, dtype):
  devices = aot.tpu_devices(aot.GENERATIONS[generation])[:1]
  shapes = op_shapes(dtype)

  def loss(*operands):
    out, final = op_forward(*operands)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(final)

  grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
  for fn, kernels in ((op_forward, 1), (grad, 2)):
    compiled = aot.compile_for(fn, devices, *shapes)
    assert aot.custom_calls(compiled)["tpu_custom_call"] == kernels


@pytest.mark.parametrize("generation", aot.GENERATIONS)
def test_every_generation_holds_the_vmem_limits(generation):
  vmem = aot.chip_memory(aot.tpu_devices(aot.GENERATIONS[generation])[0]).vmem
  q, k, v, beta, log_decay = op_shapes(jnp.float32, seq=8192, heads=1, kv_heads=1, head_dim=256)
  terms = jax.eval_shape(
    functools.partial(chunk.chunk_terms, carry=None, chunk_size=64), q, k, v, beta, log_decay
  )
  state = jax.ShapeDtypeStruct((1, 1, 256, 256), jnp.float32)
  operands = (terms.query_state, terms.w, terms.u, terms.k_end, terms.end_decay, state)

  def loss(*operands):
    out, final = tpu.state_pass(*operands)
    return jnp.sum(out) + jnp.sum(final)

  calls = pallas_calls(jax.grad(loss, argnums=tuple(range(6))), *operands)
  assert len(calls) == 2
  for call in calls:
    assert call.params["compiler_params"].vmem_limit_bytes <= vmem, call.params["name"]
