"""The Mosaic neighborhood kernels compiled for TPU v4 and v5e on compile-only devices (the real
XLA:TPU and Mosaic passes, each chip's VMEM), forward and gradient, through the op's
`impl="pallas"`; every generation's VMEM holds the kernels' limits."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import attnjax as aj
from attnjax import aot
from tests.kernels.neighborhood.test_neighborhood_tpu import (
  gradient_of,
  kernel_shapes,
  pallas_calls,
)

pytestmark = [
  pytest.mark.tpu_compile,
  pytest.mark.skipif(not aot.libtpu_installed(), reason="pip install -r requirements-compile.txt"),
]

# (spatial, kernel_size, dilation, causal, dtype): 2-D dilated GQA in bfloat16, 1-D causal in
# float32 (a length that is no multiple of the tile).
CASES = {
  "2d-dilated-bf16": ((16, 24), 5, (1, 2), False, jnp.bfloat16),
  "1d-causal-f32": ((300,), 33, 1, True, jnp.float32),
}


@pytest.mark.parametrize("generation", ["v4", "v5e"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_compiles_forward_and_gradient(generation, case):
  spatial, kernel_size, dilation, causal, dtype = case
  devices = aot.tpu_devices(aot.GENERATIONS[generation])[:1]

  def forward(q, k, v):
    return aj.ops.neighborhood_attention(
      q, k, v, kernel_size=kernel_size, dilation=dilation, causal=causal, impl="pallas"
    )

  shapes = kernel_shapes(spatial, heads=4, kv_heads=2, head_dim=64, dtype=dtype)
  for fn, kernels in ((forward, 1), (gradient_of(forward), 3)):
    compiled = aot.compile_for(fn, devices, *shapes)
    assert aot.custom_calls(compiled)["tpu_custom_call"] == kernels


@pytest.mark.parametrize("generation", aot.GENERATIONS)
def test_every_generation_holds_the_vmem_limits(generation):
  vmem = aot.chip_memory(aot.tpu_devices(aot.GENERATIONS[generation])[0]).vmem

  def forward(q, k, v):
    return aj.ops.neighborhood_attention(q, k, v, kernel_size=7, impl="pallas")

  shapes = kernel_shapes((64, 64), heads=16, kv_heads=2, head_dim=128, dtype=jnp.bfloat16)
  for name, call in pallas_calls(gradient_of(forward), *shapes).items():
    assert call.params["compiler_params"].vmem_limit_bytes <= vmem, name
