"""Both neighborhood kernels, interpreted, against the dense float32 reference: outputs and
gradients over 1-3 D windows, dilation, causal axes, GQA, odd sizes, halo and grid windows and
bfloat16; rows without keys; argument checks; the schedule the adapter builds."""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.neighborhood import BlockSizes, pallas, reference, window
from kernels_pallas import neighborhood
from kernels_pallas.neighborhood import TileSchedule
from tests.helpers import assert_close, assert_matches_reference, random_normal, tolerance

KERNELS = ("tpu", "gpu")
WINDOWS_2D = (window.Neighborhood(5), window.Neighborhood(3, dilation=2, is_causal=True))


def _qkv(seed, shape, kv_heads, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  kv_shape = (*shape[:-2], kv_heads, shape[-1])
  return (
    random_normal(keys[0], shape, dtype),
    random_normal(keys[1], kv_shape, dtype),
    random_normal(keys[2], kv_shape, dtype),
  )


def check(kernel, spatial, windows, heads=2, kv_heads=1, head_dim=12, dtype=jnp.float32,
          block_sizes=None, scale=0.3):  # fmt: skip
  """The interpreted `kernel` vs the reference on `[2, *spatial, heads, head_dim]` inputs."""
  q, k, v = _qkv(0, (2, *spatial, heads, head_dim), kv_heads, dtype)
  fn = jax.jit(
    functools.partial(
      pallas.attention_interpret, windows=windows, scale=scale, block_sizes=block_sizes,
      kernel=kernel,
    )
  )  # fmt: skip
  ref = jax.jit(functools.partial(reference.attention, windows=windows, scale=scale))
  out = jax.eval_shape(fn, q, k, v)
  assert out.dtype == dtype and out.shape == q.shape
  assert_matches_reference(fn, ref, (q, k, v), {}, tolerance(dtype), f"{kernel} {spatial}")


def neighborhoods(kernel_size, dilation=1, is_causal=False, axes=1):
  """NATTEN windows, one per axis; each argument one value or one per axis."""
  per_axis = [
    x if isinstance(x, tuple) else (x,) * axes for x in (kernel_size, dilation, is_causal)
  ]
  return tuple(window.Neighborhood(*axis) for axis in zip(*per_axis, strict=True))


# Each case has several tiles per axis, so key loops run over many tiles and the dk/dv kernel
# over real inverse neighborhoods; padded rows and keys occur in every case (odd sizes).
CASES = {
  "1d_k7_dilated_causal_gqa4": dict(
    spatial=(37,), windows=neighborhoods(7, 2, True), heads=4, kv_heads=1,
    block_sizes=BlockSizes((16,)),
  ),
  "2d_k3x5_hd60_causal_axis": dict(
    spatial=(13, 11), windows=neighborhoods((3, 5), (2, 1), (False, True), axes=2), head_dim=60
  ),
  "3d_dilated_causal": dict(
    spatial=(5, 6, 7), windows=neighborhoods((3, 3, 5), (1, 2, 1), (True, False, False), axes=3),
    heads=2, kv_heads=2,
  ),
  "2d_bf16_hd60": dict(
    spatial=(15, 9), windows=neighborhoods(7, (2, 1), (True, False), axes=2), head_dim=60,
    dtype=jnp.bfloat16,
  ),
  "halo_and_grid": dict(
    spatial=(12, 12), windows=(window.Blocked(4, halo=2), window.Grid(3, 12)), head_dim=16
  ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_matches_reference(kernel, case):
  check(kernel, **CASES[case])


@pytest.mark.parametrize("kernel", KERNELS)
@hypothesis.settings(max_examples=2, deadline=None)
@hypothesis.given(
  spatial=st.lists(st.integers(5, 19), min_size=1, max_size=2).map(tuple),
  dilation=st.integers(1, 2),
  is_causal=st.booleans(),
  kv_heads=st.sampled_from([1, 2]),
)
def test_matches_reference_on_random_shapes(kernel, spatial, dilation, is_causal, kv_heads):
  windows = neighborhoods(3, dilation, is_causal, axes=len(spatial))
  check(kernel, spatial, windows, kv_heads=kv_heads, block_sizes=BlockSizes((4,) * len(spatial)))


def _schedule_with_empty_rows():
  """Two tiles of 4 rows; rows 1 and 2 of tile 0 see nothing, tile 1 sees both tiles."""
  table = np.zeros((3, 4, 4), bool)
  table[1] = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
  table[2] = np.ones((4, 4), bool)
  return TileSchedule(
    kv_tiles=np.array([[0, 0], [0, 1]], np.int32),
    kv_counts=np.array([1, 2], np.int32),
    mask_ids=np.array([[1, 0], [2, 2]], np.int32),
    q_tiles=np.array([[0, 1], [1, 1]], np.int32),
    q_counts=np.array([2, 1], np.int32),
    mask_ids_t=np.array([[1, 2], [2, 0]], np.int32),
    mask_table=table,
  )


@pytest.mark.parametrize("kernel", KERNELS)
def test_rows_without_keys_are_zero_with_finite_gradients(kernel):
  schedule = _schedule_with_empty_rows()  # 4-row tiles: allowed when interpreting
  q, k, v = (x.transpose(0, 2, 1, 3) for x in _qkv(1, (1, 8, 2, 16), 2))
  run = functools.partial(
    getattr(neighborhood, kernel).tile_sparse_attention, schedule=schedule, scale=0.25,
    interpret=True,
  )  # fmt: skip

  def loss(q, k, v):
    rows = run(q, k, v)
    return (rows**2).sum(), rows

  (_, rows), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  np.testing.assert_array_equal(rows[:, :, 1:3], 0.0)
  for g in grads:
    assert np.all(np.isfinite(g))
  dense = np.zeros((8, 8), bool)  # the schedule's mask, query x key
  dense[0:4, 0:4] = schedule.mask_table[1]
  dense[4:8, :] = True
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
  probs = jax.nn.softmax(jnp.where(dense, logits, -jnp.inf), -1)
  expected = jnp.where(
    dense.any(-1)[:, None], jnp.einsum("bhqk,bhkd->bhqd", jnp.nan_to_num(probs), v), 0
  )
  assert_close(rows, expected, 1e-5, "tile-sparse forward")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
  "shapes, message",
  [
    (((1, 2, 12, 16), (1, 2, 8, 16), (1, 2, 8, 16)), "q must be"),
    (((1, 2, 8, 16), (1, 2, 8, 8), (1, 2, 8, 16)), "k must be"),
    (((1, 2, 8, 16), (1, 2, 8, 16), (1, 1, 8, 16)), "v must be"),
    (((1, 3, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), "multiple"),
  ],
)
def test_bad_shapes_raise(kernel, shapes, message):
  q, k, v = (jnp.ones(s) for s in shapes)
  attend = getattr(neighborhood, kernel).tile_sparse_attention
  with pytest.raises(ValueError, match=message):
    attend(q, k, v, _schedule_with_empty_rows(), scale=1.0, interpret=True)


def test_schedule_validates_its_arrays():
  lists = np.zeros((2, 1), np.int32)
  counts = np.zeros(2, np.int32)
  with pytest.raises(ValueError, match="mask_table"):
    TileSchedule(lists, counts, lists, lists, counts, lists, np.zeros((2, 4, 3), bool))
  with pytest.raises(ValueError, match="q_tiles"):
    TileSchedule(lists, counts, lists, lists[:1], counts, lists, np.zeros((2, 4, 4), bool))


def test_schedule_of_a_plan_is_cached():
  plan = window.tile_plan((16, 16), WINDOWS_2D, (8, 8))
  assert pallas.tile_schedule(plan) is pallas.tile_schedule(plan)
  assert pallas.tile_schedule(plan).tile_size == 64


def test_unknown_kernel_name_raises():
  q = jnp.ones((1, 8, 1, 16))
  with pytest.raises(ValueError, match="kernel must be one of"):
    pallas.fused_attention(q, q, q, windows=(window.Neighborhood(3),), scale=1.0, kernel="cuda")
