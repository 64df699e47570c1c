"""The Mosaic block-sparse kernel compiled by the real XLA:TPU + Mosaic compiler for v4 and
v5e on compile-only devices: forward and gradient, bf16, GQA, causal (partial mask tiles)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attnjax import aot, masks
from attnjax.ops.softmax.pallas import mask_info
from kernels_pallas import tpu_memory
from kernels_pallas.block_sparse import tpu

pytestmark = [
  pytest.mark.tpu_compile,
  pytest.mark.skipif(not aot.libtpu_installed(), reason="pip install -r requirements-compile.txt"),
]


@pytest.mark.parametrize("generation", ["v4", "v5e"])
def test_causal_forward_and_gradient_compile(generation):
  seq, heads, kv_heads, head_dim = 512, 4, 2, 128
  info = mask_info(masks.causal(), seq, seq, 128, 128, 0)
  q = jax.ShapeDtypeStruct((1, seq, heads, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, seq, kv_heads, head_dim), jnp.bfloat16)

  def forward(q, k, v):
    return tpu.block_sparse_attention(q, k, v, info, scale=head_dim**-0.5)[0]

  def gradient(q, k, v):
    return jax.grad(lambda *x: forward(*x).astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)

  devices = aot.tpu_devices(aot.GENERATIONS[generation])[:1]
  assert aot.custom_calls(aot.compile_for(forward, devices, q, kv, kv))["tpu_custom_call"] == 1
  assert aot.custom_calls(aot.compile_for(gradient, devices, q, kv, kv))["tpu_custom_call"] == 3


def test_smallest_vmem_is_the_kernels_limit():
  """`tpu_memory.smallest_tpu_vmem_bytes()` (Pallas' tables), which every call's
  `vmem_limit_bytes` stays under, is the compiler's smallest VMEM of the generations."""
  vmem = {g: aot.chip_memory(aot.tpu_devices(t)[0]).vmem for g, t in aot.GENERATIONS.items()}
  assert min(vmem.values()) == tpu_memory.smallest_tpu_vmem_bytes()
  smem = {g: aot.chip_memory(aot.tpu_devices(t)[0]).smem for g, t in aot.GENERATIONS.items()}
  assert set(smem.values()) == {tpu.SMEM_BYTES}
