"""Window math of local attention, and the tile plan every fast path executes.

A local attention mask over `[*spatial]` positions is separable: query `(q_1, ..., q_n)` sees
key `(k_1, ..., k_n)` iff on every axis `a` the axis window allows `(q_a, k_a)`. This module
defines the axis windows (NATTEN neighborhoods, HaloNet blocks with a halo, MaxViT grids) and
turns a tuple of them into a `TilePlan`: the static list of key tiles each query tile reaches,
with deduplicated boolean tiles for the partially visible ones. The XLA path and the Pallas
kernel execute the same plan, so the mask semantics live here and nowhere else.

Positions are first reordered per axis so that every window becomes contiguous: an axis with
dilation (or grid stride) `d` is padded to a multiple of `d` and viewed as `[d, size / d]`
(NATTEN's dilation groups, `position % d`, each made contiguous by a transpose), then tiled.
All of this is numpy on static shapes, computed once per geometry and cached.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np


class AxisWindow(abc.ABC):
  """Which keys a query sees along one axis of length `length` (one factor of the mask)."""

  group_stride: int = 1  # positions are grouped by `position % group_stride` before tiling

  @abc.abstractmethod
  def allowed(self, q_pos: np.ndarray, k_pos: np.ndarray, length: int) -> np.ndarray:
    """Boolean predicate on broadcastable integer arrays of query and key positions."""

  @abc.abstractmethod
  def check(self, length: int, axis: int) -> None:
    """Raises `ValueError` if the window does not fit an axis of `length` positions."""


@dataclasses.dataclass(frozen=True)
class Neighborhood(AxisWindow):
  """NATTEN neighborhood (Hassani et al. 2023, arXiv 2204.07143; dilation: arXiv 2209.15001).

  Positions are split into `dilation` groups by `position % dilation`; within its group a query
  sees exactly `kernel_size` consecutive group members, centered on it and shifted inward at
  the borders (never truncated). Causal: the `kernel_size` members at or before it (fewer at
  the start of the group).
  """

  kernel_size: int
  dilation: int = 1
  is_causal: bool = False

  @property
  def group_stride(self) -> int:
    return self.dilation

  def allowed(self, q_pos, k_pos, length):
    d, size = self.dilation, self.kernel_size
    q_group, k_group = q_pos // d, k_pos // d  # index inside the dilation group
    same_group = q_pos % d == k_pos % d
    if self.is_causal:
      return same_group & (k_group <= q_group) & (k_group > q_group - size)
    group_len = (length - q_pos % d + d - 1) // d
    start = np.clip(q_group - size // 2, 0, group_len - size)
    return same_group & (k_group >= start) & (k_group < start + size)

  def check(self, length, axis):
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise ValueError(
        f"kernel_size must be odd and >= 1 on every axis, got {self.kernel_size} on axis {axis}"
      )
    if self.dilation < 1:
      raise ValueError(f"dilation must be >= 1, got {self.dilation} on axis {axis}")
    if self.kernel_size * self.dilation > length:
      raise ValueError(
        f"kernel_size * dilation must be <= the spatial size on every axis, got "
        f"kernel_size={self.kernel_size} * dilation={self.dilation} > size {length} on axis "
        f"{axis}"
      )


@dataclasses.dataclass(frozen=True)
class Blocked(AxisWindow):
  """Non-overlapping query blocks of `block` positions seeing their block widened by `halo`.

  HaloNet (Vaswani et al. 2021, arXiv 2103.12731) with `halo > 0`; MaxViT block attention
  (Tu et al. 2022, arXiv 2204.01697) with `halo == 0`. Halo positions outside the axis are
  not attended (HaloNet pads them with zeros; masking them keeps every row a true softmax).
  """

  block: int
  halo: int = 0

  def allowed(self, q_pos, k_pos, length):
    lo = (q_pos // self.block) * self.block - self.halo
    return (k_pos >= lo) & (k_pos < lo + self.block + 2 * self.halo)

  def check(self, length, axis):
    if self.block < 1 or length % self.block:
      raise ValueError(
        f"block size must divide the spatial size, got block {self.block} for size {length} "
        f"on axis {axis}"
      )
    if self.halo < 0:
      raise ValueError(f"halo must be >= 0, got {self.halo} on axis {axis}")


@dataclasses.dataclass(frozen=True)
class Grid(AxisWindow):
  """MaxViT grid attention: a `grid` x ... grid of positions `length // grid` apart.

  Query `q` sees the keys `k` with `k % (length // grid) == q % (length // grid)`: a sparse,
  global, dilated window (Tu et al. 2022, arXiv 2204.01697).
  """

  grid: int
  length: int

  @property
  def group_stride(self) -> int:
    return self.length // self.grid

  def allowed(self, q_pos, k_pos, length):
    return q_pos % self.group_stride == k_pos % self.group_stride

  def check(self, length, axis):
    if self.length != length or self.grid < 1 or length % self.grid:
      raise ValueError(
        f"grid size must divide the spatial size, got grid {self.grid} for size {length} on "
        f"axis {axis}"
      )


def dense_mask(spatial: tuple[int, ...], windows: tuple[AxisWindow, ...]) -> np.ndarray:
  """The boolean mask `[N, N]` over row-major flattened positions, `N = prod(spatial)`."""
  mask = np.ones((1, 1), bool)
  for length, window in zip(spatial, windows, strict=True):
    pos = np.arange(length)
    axis_mask = window.allowed(pos[:, None], pos[None, :], length)
    mask = (mask[:, None, :, None] & axis_mask[None, :, None, :]).reshape(
      mask.shape[0] * length, mask.shape[1] * length
    )
  return mask


def group_order(length: int, stride: int) -> np.ndarray:
  """Original position at each index of the axis reordered by `position % stride`.

  The axis is padded to a multiple of `stride` (padding is -1) and transposed from
  `[size / stride, stride]` to `[stride, size / stride]`: group g occupies a contiguous range.
  """
  per_group = -(-length // stride)
  order = np.arange(per_group * stride).reshape(per_group, stride).T.reshape(-1)
  return np.where(order < length, order, -1)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: plans are cached
class TilePlan:
  """Static schedule of tiled local attention over a reordered, padded spatial grid.

  Positions are reordered per axis (`group_order` with `strides`), padded to whole tiles of
  shape `tile`, and laid out tile-major: tile `i` (row-major over the tile grid) holds
  positions `[i * T, (i + 1) * T)` of the flattened sequence, `T = prod(tile)`, row-major
  inside.

  Attributes:
    spatial: sizes of the spatial axes.
    tile: tile shape (the same for queries and keys).
    strides: per axis, the group stride of the reordering (1: none).
    kv_tiles: int32 `[num_tiles, max_steps]`, key tiles each query tile visits (in increasing
      order; padding steps repeat the last one).
    kv_counts: int32 `[num_tiles]`, visited key tiles per query tile.
    mask_ids: int32 `[num_tiles, max_steps]`, row of `mask_table` per step (0 for padding).
    mask_table: bool `[num_masks, T, T]` (query x key) of distinct tiles; row 0 is all False.
    q_tiles: int32 `[num_tiles, max_steps_t]`, the transpose: query tiles that see each key
      tile (for the backward pass over keys), with `q_counts` and `mask_ids_t` (rows of the
      same `mask_table`, which is query x key).
  """

  spatial: tuple[int, ...]
  tile: tuple[int, ...]
  strides: tuple[int, ...]
  kv_tiles: np.ndarray
  kv_counts: np.ndarray
  mask_ids: np.ndarray
  mask_table: np.ndarray
  q_tiles: np.ndarray
  q_counts: np.ndarray
  mask_ids_t: np.ndarray

  @property
  def reordered(self) -> tuple[int, ...]:
    """Axis sizes after the reordering (padded to multiples of the strides)."""
    return tuple(-(-n // d) * d for n, d in zip(self.spatial, self.strides, strict=True))

  @property
  def grid(self) -> tuple[int, ...]:
    return tuple(-(-n // t) for n, t in zip(self.reordered, self.tile, strict=True))

  def positions(self, axis: int) -> np.ndarray:
    """Original position at each index of the reordered, tile-padded `axis` (-1: padding)."""
    pos = np.full(self.grid[axis] * self.tile[axis], -1)
    pos[: self.reordered[axis]] = group_order(self.spatial[axis], self.strides[axis])
    return pos

  @property
  def tile_size(self) -> int:
    return math.prod(self.tile)

  @property
  def num_tiles(self) -> int:
    return math.prod(self.grid)

  @property
  def visited_fraction(self) -> float:
    """Visited (query tile, key tile) pairs / all pairs: the work relative to dense attention."""
    return float(self.kv_counts.sum()) / self.num_tiles**2


@functools.lru_cache(maxsize=64)
def tile_plan(
  spatial: tuple[int, ...], windows: tuple[AxisWindow, ...], tile: tuple[int, ...]
) -> TilePlan:
  """Builds (and caches) the `TilePlan` of the separable mask `windows` over `spatial`."""
  strides = tuple(w.group_stride for w in windows)
  axis_tiles, axis_reach = [], []
  for length, window, size, stride in zip(spatial, windows, tile, strides, strict=True):
    tiles, reach = _axis_tiles(length, window, size, group_order(length, stride))
    axis_tiles.append(tiles)
    axis_reach.append(reach)

  table_index: dict[tuple[int, ...], int] = {}
  kv_lists, id_lists = [], []
  for q_tile in itertools.product(*(range(len(r)) for r in axis_reach)):
    kv, ids = [], []
    for combo in itertools.product(*(r[i] for r, i in zip(axis_reach, q_tile, strict=True))):
      kv.append(np.ravel_multi_index(tuple(j for j, _ in combo), [len(r) for r in axis_reach]))
      ids.append(table_index.setdefault(tuple(t for _, t in combo), len(table_index) + 1))
    kv_lists.append(kv)
    id_lists.append(ids)
  mask_table = np.zeros((len(table_index) + 1, math.prod(tile), math.prod(tile)), bool)
  for key, row in table_index.items():
    mask_table[row] = _outer_and([t[i] for t, i in zip(axis_tiles, key, strict=True)])

  kv_tiles, kv_counts, mask_ids = _pad_lists(kv_lists, id_lists)
  q_lists, id_lists_t = [[] for _ in kv_lists], [[] for _ in kv_lists]
  for q, (kv, ids) in enumerate(zip(kv_lists, id_lists, strict=True)):
    for j, m in zip(kv, ids, strict=True):
      q_lists[j].append(q)
      id_lists_t[j].append(m)
  q_tiles, q_counts, mask_ids_t = _pad_lists(q_lists, id_lists_t)
  return TilePlan(
    tuple(spatial),
    tuple(tile),
    strides,
    kv_tiles,
    kv_counts,
    mask_ids,
    mask_table,
    q_tiles,
    q_counts,
    mask_ids_t,
  )


def _axis_tiles(length: int, window: AxisWindow, size: int, order: np.ndarray):
  """Distinct `[size, size]` tiles of one axis and, per query tile, `(key tile, tile id)`s."""
  num = -(-len(order) // size)
  pos = np.full(num * size, -1)
  pos[: len(order)] = order
  valid = pos >= 0
  axis_mask = window.allowed(pos[:, None], pos[None, :], length) & valid[:, None] & valid[None]
  blocks = axis_mask.reshape(num, size, num, size).transpose(0, 2, 1, 3)
  distinct: dict[bytes, int] = {}
  tiles, reach = [], []
  for i in range(num):
    row = []
    for j in range(num):
      if blocks[i, j].any():
        tile_id = distinct.setdefault(blocks[i, j].tobytes(), len(distinct))
        if tile_id == len(tiles):
          tiles.append(blocks[i, j])
        row.append((j, tile_id))
    reach.append(row)
  return tiles, reach


def _outer_and(axis_tiles: list[np.ndarray]) -> np.ndarray:
  """`[T, T]` tile from per-axis `[t_a, t_a]` tiles (row-major positions inside the tile)."""
  out = np.ones((1, 1), bool)
  for t in axis_tiles:
    out = (out[:, None, :, None] & t[None, :, None, :]).reshape(
      out.shape[0] * t.shape[0], out.shape[1] * t.shape[1]
    )
  return out


def _pad_lists(index_lists, id_lists):
  counts = np.array([len(x) for x in index_lists], np.int32)
  width = max(int(counts.max(initial=0)), 1)
  indices = np.zeros((len(index_lists), width), np.int32)
  ids = np.zeros((len(index_lists), width), np.int32)
  for row, (idx, mid) in enumerate(zip(index_lists, id_lists, strict=True)):
    if idx:
      indices[row, : len(idx)] = idx
      indices[row, len(idx) :] = idx[-1]
      ids[row, : len(mid)] = mid
  return indices, counts, ids


def to_tiles(x: jax.Array, plan: TilePlan) -> jax.Array:
  """`[batch, *spatial, heads, dim]` -> tile-major `[batch, num_tiles, T, heads, dim]`.

  Applies the plan's per-axis reordering (pad + transpose) and zero-pads to whole tiles.
  """
  n = len(plan.spatial)
  for axis, (length, stride) in enumerate(zip(plan.spatial, plan.strides, strict=True)):
    if stride > 1:
      x = _pad_axis(x, 1 + axis, -(-length // stride) * stride)
      split = (*x.shape[: 1 + axis], -1, stride, *x.shape[2 + axis :])
      x = jnp.swapaxes(x.reshape(split), 1 + axis, 2 + axis).reshape(x.shape)
  for axis, size in enumerate(plan.grid):
    x = _pad_axis(x, 1 + axis, size * plan.tile[axis])
  split = [d for g, t in zip(plan.grid, plan.tile, strict=True) for d in (g, t)]
  x = x.reshape(x.shape[0], *split, *x.shape[-2:])
  tiles_first = [0, *range(1, 2 * n, 2), *range(2, 2 * n + 1, 2), 2 * n + 1, 2 * n + 2]
  return x.transpose(tiles_first).reshape(x.shape[0], plan.num_tiles, plan.tile_size, *x.shape[-2:])


def from_tiles(y: jax.Array, plan: TilePlan) -> jax.Array:
  """Inverse of `to_tiles`: `[batch, num_tiles, T, heads, dim]` -> `[batch, *spatial, ...]`."""
  n = len(plan.spatial)
  y = y.reshape(y.shape[0], *plan.grid, *plan.tile, *y.shape[-2:])
  interleaved = [0, *(i for a in range(n) for i in (1 + a, 1 + n + a)), 2 * n + 1, 2 * n + 2]
  y = y.transpose(interleaved)
  y = y.reshape(
    y.shape[0], *(g * t for g, t in zip(plan.grid, plan.tile, strict=True)), *y.shape[-2:]
  )
  y = y[(slice(None), *(slice(0, r) for r in plan.reordered))]
  for axis, stride in enumerate(plan.strides):
    if stride > 1:
      split = (*y.shape[: 1 + axis], stride, -1, *y.shape[2 + axis :])
      y = jnp.swapaxes(y.reshape(split), 1 + axis, 2 + axis).reshape(y.shape)
  return y[(slice(None), *(slice(0, s) for s in plan.spatial))]


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads `axis` of `x` at the end up to `size`."""
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)
