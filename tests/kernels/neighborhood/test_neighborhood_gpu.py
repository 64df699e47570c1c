"""The Triton GPU neighborhood kernel: what `impl="pallas"` runs on GPU, its power-of-two tiles,
and lowering for CUDA with `jax.export` on CPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from attnjax.ops.neighborhood import BlockSizes, neighborhood_attention, pallas, window
from kernels_pallas.neighborhood import gpu
from tests.helpers import TOL_BLOCKED_F32, assert_close, kernel_on_cpu, random_normal


def test_impl_pallas_on_gpu_runs_the_gpu_kernel(monkeypatch):
  def gpu_interpreted(*args, interpret, **kwargs):
    del interpret  # the test host has no GPU: run the Triton kernel in the interpreter
    return gpu.tile_sparse_attention(*args, interpret=True, **kwargs)

  def not_tpu(*args, **kwargs):
    raise AssertionError("impl='pallas' on GPU called the TPU kernel")

  kernel_on_cpu(monkeypatch, "gpu")
  monkeypatch.setitem(pallas.KERNELS, "gpu", gpu_interpreted)
  monkeypatch.setitem(pallas.KERNELS, "tpu", not_tpu)
  keys = jax.random.split(jax.random.PRNGKey(2), 3)
  q = random_normal(keys[0], (1, 21, 2, 8))
  k, v = (random_normal(key, (1, 21, 1, 8)) for key in keys[1:])
  out = neighborhood_attention(q, k, v, kernel_size=5, impl="pallas")
  ref = neighborhood_attention(q, k, v, kernel_size=5, impl="reference")
  assert_close(out, ref, TOL_BLOCKED_F32, "impl='pallas' with a GPU backend")


@pytest.mark.parametrize(
  "spatial, windows, tile",
  [
    ((5,), (window.Neighborhood(3),), (16,)),  # at least MIN_DOT rows
    ((300,), (window.Neighborhood(9),), (64,)),
    ((13, 11), (window.Neighborhood(5),) * 2, (8, 8)),
    ((3, 3), (window.Neighborhood(3),) * 2, (4, 4)),
    ((3, 2, 2), (window.Neighborhood(1),) * 3, (4, 2, 2)),
    ((8,), (window.Neighborhood(1, dilation=3),), (16,)),  # dilation groups pad 8 to 9
  ],
)
def test_gpu_tiles_are_powers_of_two(spatial, windows, tile):
  assert pallas.kernel_tile("gpu", spatial, windows) == tile


def test_gpu_rows_over_512_bytes_take_half_height_tiles():
  """head_dim 256 in float32: 32-row tiles, so the pipelined K/V tiles fit an A100."""
  windows_1d, windows_2d = (window.Neighborhood(9),), (window.Neighborhood(5),) * 2
  assert pallas.kernel_tile("gpu", (300,), windows_1d, row_bytes=1024) == (32,)
  assert pallas.kernel_tile("gpu", (13, 11), windows_2d, row_bytes=1024) == (4, 8)
  assert pallas.kernel_tile("gpu", (13, 11), windows_2d, row_bytes=512) == (8, 8)


def test_gpu_tiles_round_requested_block_sizes_up():
  windows = (window.Neighborhood(3),) * 2
  assert pallas.kernel_tile("gpu", (40, 40), windows, BlockSizes((24, 3))) == (32, 4)


@pytest.mark.parametrize(
  "tile, message",
  [((3, 8), "powers of two"), ((), "non-empty"), ((0,), "powers of two"), ([8], "tuple")],
)
def test_bad_block_sizes_raise(tile, message):
  with pytest.raises(ValueError, match=message):
    gpu.BlockSizes(tile)


def test_block_sizes_need_one_size_per_axis():
  with pytest.raises(ValueError, match="one size per spatial axis"):
    gpu.BlockSizes((8, 8)).fit((16,))


@pytest.mark.parametrize(
  "tile, interpret, message",
  [
    ((3, 8), True, "must be a power of two >= 1 for"),
    ((2, 2), False, "must be a power of two >= 16"),
  ],
)
def test_kernel_rejects_bad_schedule_tiles(tile, interpret, message):
  plan = window.tile_plan((6, 16), (window.Neighborhood(3),) * 2, tile)
  q = jnp.ones((1, 1, plan.num_tiles * plan.tile_size, 16))
  with pytest.raises(ValueError, match=message):
    gpu.tile_sparse_attention(q, q, q, pallas.tile_schedule(plan), scale=1.0, interpret=interpret)


def _export_for_cuda(fn, *args):
  # Triton custom calls carry no serialization-compatibility guarantee; lowering is the check.
  triton = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=triton)(*args)
  return exported.mlir_module().count("__gpu$xla.gpu.triton")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize(
  "spatial, windows, kv_heads",
  [
    ((300,), (window.Neighborhood(33, is_causal=True),), 1),
    ((16, 24), (window.Neighborhood(7), window.Neighborhood(5, dilation=2)), 2),
    ((8, 8, 16), (window.Neighborhood(3),) * 3, 4),
  ],
  ids=["1d_causal_mqa", "2d_dilated_gqa", "3d"],
)
def test_lowers_for_cuda_forward_and_gradient(dtype, spatial, windows, kv_heads):
  q = jax.ShapeDtypeStruct((2, *spatial, 4, 60), dtype)
  kv = jax.ShapeDtypeStruct((2, *spatial, kv_heads, 60), dtype)
  run = functools.partial(pallas.fused_attention, windows=windows, scale=0.125, kernel="gpu")

  def grads(q, k, v):
    return jax.grad(lambda *a: run(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

  assert _export_for_cuda(run, q, kv, kv) == 1
  assert _export_for_cuda(grads, q, kv, kv) == 3  # forward (residuals), dq, dk/dv
