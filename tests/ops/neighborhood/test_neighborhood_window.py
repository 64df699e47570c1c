"""Mask semantics of neighborhood attention against a brute-force definition, and tile plans."""

from __future__ import annotations

import itertools
import math

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from attnjax.ops.neighborhood import window


def brute_force_neighbors(i: int, length: int, kernel_size: int, dilation: int, causal: bool):
  """NATTEN's neighbor set of position `i`, written from its definition with lists."""
  group = [p for p in range(length) if p % dilation == i % dilation]
  j = group.index(i)
  if causal:
    return set(group[max(0, j - kernel_size + 1) : j + 1])
  start = min(max(j - kernel_size // 2, 0), len(group) - kernel_size)
  return set(group[start : start + kernel_size])


@st.composite
def neighborhood_geometries(draw):
  ndim = draw(st.integers(1, 3))
  spatial, windows = [], []
  for _ in range(ndim):
    length = draw(st.integers(1, 14 if ndim > 1 else 40))
    dilation = draw(st.integers(1, length))
    kernel_size = draw(st.sampled_from([k for k in (1, 3, 5, 7) if k * dilation <= length]))
    spatial.append(length)
    windows.append(window.Neighborhood(kernel_size, dilation, draw(st.booleans())))
  return tuple(spatial), tuple(windows)


@hypothesis.given(neighborhood_geometries())
def test_dense_mask_matches_brute_force(geometry):
  spatial, windows = geometry
  mask = window.dense_mask(spatial, windows)
  positions = list(itertools.product(*(range(n) for n in spatial)))
  for row, query in enumerate(positions):
    per_axis = [
      brute_force_neighbors(i, n, w.kernel_size, w.dilation, w.is_causal)
      for i, n, w in zip(query, spatial, windows, strict=True)
    ]
    expected = set(itertools.product(*per_axis))
    got = {positions[col] for col in np.flatnonzero(mask[row])}
    assert got == expected, f"query {query}"
    if not any(w.is_causal for w in windows):  # every query sees the full kernel volume
      assert len(got) == math.prod(w.kernel_size for w in windows)


def _plan_to_dense(plan: window.TilePlan) -> np.ndarray:
  """The mask a plan executes, mapped back to row-major original positions."""
  t = plan.tile_size
  padded = np.zeros((plan.num_tiles * t,) * 2, bool)
  for q_tile in range(plan.num_tiles):
    for step in range(plan.kv_counts[q_tile]):
      k_tile = plan.kv_tiles[q_tile, step]
      tile = plan.mask_table[plan.mask_ids[q_tile, step]]
      padded[q_tile * t : (q_tile + 1) * t, k_tile * t : (k_tile + 1) * t] |= tile
  # Original position of every tile-major row along each axis (-1 for padding).
  n = len(plan.spatial)
  coords = np.indices(tuple(g * s for g, s in zip(plan.grid, plan.tile, strict=True)))
  split = [d for g, s in zip(plan.grid, plan.tile, strict=True) for d in (g, s)]
  order_axes = [*range(0, 2 * n, 2), *range(1, 2 * n, 2)]
  tile_major = [
    plan.positions(axis)[coords[axis]].reshape(split).transpose(order_axes).reshape(-1)
    for axis in range(n)
  ]
  valid = np.all([o >= 0 for o in tile_major], axis=0)
  flat = np.ravel_multi_index([np.maximum(o, 0) for o in tile_major], plan.spatial)
  dense = np.zeros((math.prod(plan.spatial),) * 2, bool)
  rows, cols = np.nonzero(padded & valid[:, None] & valid[None, :])
  dense[flat[rows], flat[cols]] = True
  return dense


@hypothesis.given(neighborhood_geometries(), st.integers(1, 6))
def test_tile_plan_executes_the_dense_mask(geometry, tile_size):
  spatial, windows = geometry
  plan = window.tile_plan(spatial, windows, tuple(min(tile_size, n) for n in spatial))
  np.testing.assert_array_equal(_plan_to_dense(plan), window.dense_mask(spatial, windows))
  # The transposed lists hold exactly the same (query tile, key tile, mask) triples.
  forward = {
    (q, plan.kv_tiles[q, s], plan.mask_ids[q, s])
    for q in range(plan.num_tiles)
    for s in range(plan.kv_counts[q])
  }
  transposed = {
    (plan.q_tiles[k, s], k, plan.mask_ids_t[k, s])
    for k in range(plan.num_tiles)
    for s in range(plan.q_counts[k])
  }
  assert forward == transposed


def test_tile_plan_work_is_linear_in_size():
  windows = (window.Neighborhood(7), window.Neighborhood(7))
  small = window.tile_plan((32, 32), windows, (8, 8))
  large = window.tile_plan((128, 128), windows, (8, 8))
  # 7 // 2 = 3 neighbors spill into at most one tile on each side: 3 x 3 key tiles per tile.
  assert small.kv_counts.max() == large.kv_counts.max() == 9
  assert large.visited_fraction < small.visited_fraction / 10


def test_dilated_plan_visits_only_its_group():
  windows = (window.Neighborhood(5, dilation=4),)
  plan = window.tile_plan((64,), windows, (8,))
  assert plan.kv_counts.max() <= 3


def test_group_order_makes_dilation_groups_contiguous():
  np.testing.assert_array_equal(window.group_order(7, 3), [0, 3, 6, 1, 4, -1, 2, 5, -1])


@pytest.mark.parametrize(
  "axis_window, length, message",
  [
    (window.Neighborhood(4), 10, "odd"),
    (window.Neighborhood(5, dilation=3), 14, "kernel_size \\* dilation"),
    (window.Neighborhood(3, dilation=0), 14, "dilation"),
    (window.Blocked(3), 10, "divide"),
    (window.Blocked(2, halo=-1), 10, "halo"),
    (window.Grid(3, 10), 10, "divide"),
  ],
)
def test_windows_reject_bad_geometry(axis_window, length, message):
  with pytest.raises(ValueError, match=message):
    axis_window.check(length, 0)
