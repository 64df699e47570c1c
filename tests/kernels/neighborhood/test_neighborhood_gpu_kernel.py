"""Triton (GPU) neighborhood kernel: interpreter vs reference through the op's shared checks,
empty rows, tile-size errors, backend wiring, and lowering for CUDA with `jax.export` on CPU."""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.neighborhood import (
  BlockSizes,
  api,
  neighborhood_attention,
  pallas,
  reference,
  window,
)
from kernels_pallas.neighborhood import gpu
from tests.helpers import TOL_BLOCKED_F32, assert_close, random_normal
from tests.kernels.neighborhood.test_neighborhood_kernel import _qkv, _schedule_with_empty_rows
from tests.ops.neighborhood import test_neighborhood_attention as shared


@pytest.fixture
def gpu_kernel_interpreted(monkeypatch):
  """Routes impl='pallas_interpret' to the Triton kernel for the duration of a test."""
  interpreted = functools.partial(pallas.attention_interpret, kernel="gpu")
  monkeypatch.setitem(api.IMPLS, "pallas_interpret", interpreted)


# Each case has several tiles per axis, so key loops run over many tiles and the dk/dv kernel
# over real inverse neighborhoods; padded rows and keys occur in every case (odd sizes).
CASES = {
  "1d_k7_dilated_causal_gqa4": dict(
    spatial=(37,),
    kernel_size=7,
    dilation=2,
    is_causal=True,
    heads=4,
    kv_heads=1,
    block_sizes=BlockSizes((16,)),
  ),
  "2d_k3x5_hd60_causal_axis": dict(
    spatial=(13, 11), kernel_size=(3, 5), dilation=(2, 1), is_causal=(False, True), head_dim=60
  ),
  "3d_dilated_causal": dict(
    spatial=(5, 6, 7),
    kernel_size=(3, 3, 5),
    dilation=(1, 2, 1),
    is_causal=(True, False, False),
    heads=2,
    kv_heads=2,
  ),
}


@pytest.mark.parametrize("case", CASES)
def test_gpu_kernel_matches_reference_float32(gpu_kernel_interpreted, case):
  shared.check_against_reference("pallas_interpret", **CASES[case])


def test_gpu_kernel_matches_reference_bfloat16(gpu_kernel_interpreted):
  shared.check_against_reference(
    "pallas_interpret",
    (15, 9),
    kernel_size=7,
    dilation=(2, 1),
    is_causal=(True, False),
    head_dim=60,
    dtype=jnp.bfloat16,
  )


@hypothesis.settings(max_examples=2, deadline=None)
@hypothesis.given(
  spatial=st.lists(st.integers(5, 19), min_size=1, max_size=2).map(tuple),
  dilation=st.integers(1, 2),
  is_causal=st.booleans(),
  kv_heads=st.sampled_from([1, 2]),
)
def test_gpu_kernel_matches_reference_on_random_shapes(spatial, dilation, is_causal, kv_heads):
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(
      api.IMPLS, "pallas_interpret", functools.partial(pallas.attention_interpret, kernel="gpu")
    )
    shared.check_against_reference(
      "pallas_interpret",
      spatial,
      kv_heads=kv_heads,
      kernel_size=3,
      dilation=dilation,
      is_causal=is_causal,
      block_sizes=BlockSizes((4,) * len(spatial)),
    )


def test_gpu_kernel_runs_halo_and_grid_windows():
  """HaloNet / MaxViT windows (`local_attention`) go through the same kernel on GPU."""
  windows = (window.Blocked(4, halo=2), window.Grid(3, 12))
  q, k, v = _qkv(3, (1, 12, 12, 2, 16), 1)
  d_out = random_normal(jax.random.PRNGKey(4), q.shape)
  gpu_run = functools.partial(pallas.attention_interpret, windows=windows, scale=0.3, kernel="gpu")
  ref_run = functools.partial(reference.attention, windows=windows, scale=0.3)
  out, grads = jax.jit(functools.partial(_value_and_vjp, gpu_run, d_out))(q, k, v)
  ref, ref_grads = jax.jit(functools.partial(_value_and_vjp, ref_run, d_out))(q, k, v)
  assert_close(out, ref, TOL_BLOCKED_F32, "halo/grid out")
  for name, g, g_ref in zip("qkv", grads, ref_grads, strict=True):
    assert_close(g, g_ref, 2 * TOL_BLOCKED_F32, f"halo/grid d{name}")


def _value_and_vjp(run, d_out, *args):
  out, vjp = jax.vjp(run, *args)
  return out, vjp(d_out)


def test_rows_without_keys_are_zero_with_finite_gradients():
  schedule = _schedule_with_empty_rows()  # 4-row tiles: allowed when interpreting
  q, k, v = (x.transpose(0, 2, 1, 3) for x in _qkv(1, (1, 8, 2, 16), 2))
  run = functools.partial(gpu.tile_sparse_attention, schedule=schedule, scale=0.25, interpret=True)

  def loss(q, k, v):
    rows = run(q, k, v)
    return (rows**2).sum(), rows

  (_, rows), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  np.testing.assert_array_equal(rows[:, :, 1:3], 0.0)
  for g in grads:
    assert np.all(np.isfinite(g))
  tpu_rows = pallas.tpu.tile_sparse_attention(q, k, v, schedule, scale=0.25, interpret=True)
  assert_close(rows, tpu_rows, 1e-5, "GPU vs TPU kernel on a hand-made schedule")


def test_impl_pallas_on_gpu_runs_the_gpu_kernel(monkeypatch):
  def gpu_interpreted(*args, interpret, **kwargs):
    del interpret  # the test host has no GPU: run the Triton kernel in the interpreter
    return gpu.tile_sparse_attention(*args, interpret=True, **kwargs)

  def not_tpu(*args, **kwargs):
    raise AssertionError("impl='pallas' on GPU called the TPU kernel")

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setitem(pallas.KERNELS, "gpu", gpu_interpreted)
  monkeypatch.setitem(pallas.KERNELS, "tpu", not_tpu)
  q, k, v = _qkv(2, (1, 21, 2, 8), 1)
  out = neighborhood_attention(q, k, v, kernel_size=5, impl="pallas")
  ref = neighborhood_attention(q, k, v, kernel_size=5, impl="reference")
  assert_close(out, ref, TOL_BLOCKED_F32, "impl='pallas' with a GPU backend")


@pytest.mark.parametrize(
  "spatial, windows, tile",
  [
    ((5,), (window.Neighborhood(3),), (16,)),  # at least MIN_ROWS rows
    ((300,), (window.Neighborhood(9),), (64,)),
    ((13, 11), (window.Neighborhood(5),) * 2, (8, 8)),
    ((3, 3), (window.Neighborhood(3),) * 2, (4, 4)),
    ((3, 2, 2), (window.Neighborhood(1),) * 3, (4, 2, 2)),
    ((8,), (window.Neighborhood(1, dilation=3),), (16,)),  # dilation groups pad 8 to 9
  ],
)
def test_gpu_tiles_are_powers_of_two(spatial, windows, tile):
  assert pallas.kernel_tile("gpu", spatial, windows) == tile


def test_gpu_tiles_round_requested_block_sizes_up():
  windows = (window.Neighborhood(3),) * 2
  assert pallas.kernel_tile("gpu", (40, 40), windows, BlockSizes((24, 3))) == (32, 4)


@pytest.mark.parametrize(
  "tile, message",
  [((3, 8), "powers of two"), ((), "non-empty"), ((0,), "powers of two"), ([8], "tuple")],
)
def test_bad_tile_sizes_raise(tile, message):
  with pytest.raises(ValueError, match=message):
    gpu.BlockSizes(tile)


def test_tile_sizes_need_one_size_per_axis():
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


def test_unknown_kernel_name_raises():
  q = jnp.ones((1, 8, 1, 16))
  with pytest.raises(ValueError, match="kernel must be one of"):
    pallas.fused_attention(q, q, q, windows=(window.Neighborhood(3),), scale=1.0, kernel="cuda")


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
