"""Pieces shared by the neighborhood kernels: the static tile schedule, the argument checks and
the dot dimension numbers.

The schedule is computed by `attnjax.ops.neighborhood.window.tile_plan` (the window geometry
lives there, shared with the XLA path); the kernels only walk it.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

# dot_general dimension numbers of 2-D tiles.
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static kernel argument
class TileSchedule:
  """Which key tiles each query tile visits, and under which boolean tile.

  Attributes:
    kv_tiles: int32 `[num_tiles, steps]`, key tiles per query tile (padding repeats the last).
    kv_counts: int32 `[num_tiles]`, how many of `kv_tiles` are real.
    mask_ids: int32 `[num_tiles, steps]`, row of `mask_table` for each step.
    q_tiles: int32 `[num_tiles, steps_t]`, query tiles per key tile (the transposed list).
    q_counts: int32 `[num_tiles]`.
    mask_ids_t: int32 `[num_tiles, steps_t]`, row of `mask_table` for each transposed step.
    mask_table: bool `[num_masks, T, T]`, query x key.
  """

  kv_tiles: np.ndarray
  kv_counts: np.ndarray
  mask_ids: np.ndarray
  q_tiles: np.ndarray
  q_counts: np.ndarray
  mask_ids_t: np.ndarray
  mask_table: np.ndarray

  def __post_init__(self):
    n = self.kv_counts.shape[0]
    for name in ("kv_tiles", "mask_ids", "q_tiles", "mask_ids_t"):
      if getattr(self, name).ndim != 2 or getattr(self, name).shape[0] != n:
        raise ValueError(
          f"TileSchedule.{name} must be [num_tiles={n}, steps], got {getattr(self, name).shape}"
        )
    if self.mask_table.ndim != 3 or self.mask_table.shape[1] != self.mask_table.shape[2]:
      raise ValueError(
        f"TileSchedule.mask_table must be [masks, T, T], got {self.mask_table.shape}"
      )

  @property
  def num_tiles(self) -> int:
    return self.kv_counts.shape[0]

  @property
  def tile_size(self) -> int:
    return self.mask_table.shape[1]


def check_call(q: jax.Array, k: jax.Array, v: jax.Array, schedule: TileSchedule) -> None:
  """Raises `ValueError` unless q, k, v are heads-major rows of the schedule's tiles.

  Wanted: q `[batch, heads, N, head_dim]`, k `[batch, kv_heads, N, head_dim]`,
  v `[batch, kv_heads, N, value_dim]`, `N = num_tiles * T` and `heads % kv_heads == 0`.
  """
  n = schedule.num_tiles * schedule.tile_size
  if q.ndim != 4 or q.shape[2] != n:
    raise ValueError(f"q must be [batch, heads, N={n}, head_dim], got shape {q.shape}")
  if k.ndim != 4 or k.shape[0] != q.shape[0] or k.shape[2:] != (n, q.shape[3]):
    raise ValueError(
      f"k must be [batch={q.shape[0]}, kv_heads, N={n}, head_dim={q.shape[3]}], got {k.shape}"
    )
  if v.ndim != 4 or v.shape[:3] != k.shape[:3]:
    raise ValueError(
      f"v must be [batch, kv_heads, N, value_dim] = {k.shape[:3]} + (dv,), got {v.shape}"
    )
  if q.shape[1] % k.shape[1]:
    raise ValueError(f"q heads {q.shape[1]} must be a multiple of k heads {k.shape[1]}")
