"""The Mosaic chunked-linear kernels compiled for TPU v4 and v5e on compile-only devices (the
real XLA:TPU and Mosaic passes, each chip's VMEM), forward and gradient, through the op's
`impl="pallas"`; every generation's VMEM holds the kernels' limits at T=8192, head_dim 256."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import attnjax as aj
from attnjax import aot
from tests.kernels.chunked_linear.test_chunked_linear_tpu import (
  gradient_of,
  kernel_call,
  operand_shapes,
  pallas_calls,
)

pytestmark = [
  pytest.mark.tpu_compile,
  pytest.mark.skipif(not aot.libtpu_installed(), reason="pip install -r requirements-compile.txt"),
]

# (decay kind, dtype): per-token scalar decay in bfloat16 (MXU scores), per-channel in float32.
CASES = {"scalar-bf16": ("scalar", jnp.bfloat16), "vector-f32": ("vector", jnp.float32)}


def op_shapes(decay_kind, dtype, seq=256, heads=4, kv_heads=2, head_dim=128):
  """(q, k, v, log_decay) of the public op."""
  decay = {"scalar": (1, seq, heads), "vector": (1, seq, heads, head_dim)}[decay_kind]
  return (
    jax.ShapeDtypeStruct((1, seq, heads, head_dim), dtype),
    jax.ShapeDtypeStruct((1, seq, kv_heads, head_dim), dtype),
    jax.ShapeDtypeStruct((1, seq, kv_heads, head_dim), dtype),
    jax.ShapeDtypeStruct(decay, jnp.float32),
  )


def op_forward(q, k, v, log_decay):
  return aj.ops.linear_attention(
    q, k, v, log_decay=log_decay, return_final_state=True, chunk_size=64, impl="pallas"
  )


@pytest.mark.parametrize("generation", ["v4", "v5e"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_compiles_forward_and_gradient(generation, case):
  devices = aot.tpu_devices(aot.GENERATIONS[generation])[:1]
  shapes = op_shapes(*case)

  def loss(*operands):
    out, final = op_forward(*operands)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(final)

  grad = jax.grad(loss, argnums=(0, 1, 2, 3))
  for fn, kernels in ((op_forward, 1), (grad, 2)):
    compiled = aot.compile_for(fn, devices, *shapes)
    assert aot.custom_calls(compiled)["tpu_custom_call"] == kernels


@pytest.mark.parametrize("generation", aot.GENERATIONS)
@pytest.mark.parametrize("vector", [False, True], ids=["scalar_decay", "vector_decay"])
def test_every_generation_holds_the_vmem_limits(generation, vector):
  vmem = aot.chip_memory(aot.tpu_devices(aot.GENERATIONS[generation])[0]).vmem
  shapes = operand_shapes(seq=8192, key_dim=256, value_dim=256, vector=vector)
  calls = pallas_calls(gradient_of(kernel_call(interpret=False)), *shapes)
  for call in calls:
    assert call.params["compiler_params"].vmem_limit_bytes <= vmem, call.params["name"]
