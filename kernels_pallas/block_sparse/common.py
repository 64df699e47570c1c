"""Pieces shared by the block-sparse kernels: block sizes and the tile lists they iterate over.

The kernels depend on jax only: `attnjax.masks.BlockMask` is converted to a `MaskInfo` by
`attnjax.ops.softmax.pallas` before the call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes. On TPU, `block_q % 8 == 0` and `block_kv % 128 == 0` (or one block spans the
  whole padded length); partial-mask tiles are int8, so `block_q % 32 == 0` there too."""

  block_q: int = 512
  block_kv: int = 512

  def __post_init__(self):
    for name in ("block_q", "block_kv"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")

  def fit(self, q_len: int, kv_len: int) -> BlockSizes:
    """Shrinks blocks longer than the sequence lengths (rounded up to multiples of 8)."""
    return BlockSizes(
      min(self.block_q, -(-q_len // 8) * 8), min(self.block_kv, -(-kv_len // 8) * 8)
    )

  def check_tpu(self, q_len_padded: int, kv_len_padded: int) -> None:
    """Raises ValueError unless the tiles satisfy Mosaic's (8, 128) block-shape rule."""
    if self.block_q % 32 and self.block_q != q_len_padded:
      raise ValueError(
        f"block_q={self.block_q} must be a multiple of 32 on TPU (8 for f32 rows, 32 for the "
        f"int8 mask tiles) or equal the padded q length {q_len_padded}"
      )
    if self.block_kv % 128 and self.block_kv != kv_len_padded:
      raise ValueError(
        f"block_kv={self.block_kv} must be a multiple of 128 on TPU or equal the padded kv "
        f"length {kv_len_padded}"
      )


@dataclasses.dataclass(frozen=True, eq=False)
class MaskInfo:
  """Per-row tile lists of a block-sparse mask, forward and transposed.

  Forward rows are query blocks: `counts [mask_heads, n_q_blocks]` live kv blocks, listed in
  `indices [mask_heads, n_q_blocks, max_count]` (padding repeats the last id so the pipeline
  skips the copy), `kinds` (FULL: no mask needed; PARTIAL: apply `tiles[partial_ids]`).
  Transposed rows (`t_*`, for dk/dv) are kv blocks listing query blocks; their `t_partial_ids`
  index the same `tiles [num_tiles, block_q, block_kv]` (int8, query-major).
  `mask_heads` is 1, or the number of query heads for a per-head mask.
  """

  counts: np.ndarray
  indices: np.ndarray
  kinds: np.ndarray
  partial_ids: np.ndarray
  t_counts: np.ndarray
  t_indices: np.ndarray
  t_kinds: np.ndarray
  t_partial_ids: np.ndarray
  tiles: np.ndarray
  block_q: int
  block_kv: int

  @property
  def mask_heads(self) -> int:
    return self.counts.shape[0]

  @property
  def num_q_blocks(self) -> int:
    return self.counts.shape[1]

  @property
  def num_kv_blocks(self) -> int:
    return self.t_counts.shape[1]

  def visited_tiles(self) -> int:
    """Tiles the forward grid computes (the rest of the grid steps do no work)."""
    return int(np.asarray(self.counts).sum())


jax.tree_util.register_dataclass(
  MaskInfo,
  data_fields=[
    "counts",
    "indices",
    "kinds",
    "partial_ids",
    "t_counts",
    "t_indices",
    "t_kinds",
    "t_partial_ids",
    "tiles",
  ],
  meta_fields=["block_q", "block_kv"],
)


def check_call(q, k, v, mask_info: MaskInfo) -> None:
  """Validates `[b, t, h, d]` q/k/v against each other and against the mask's tiling."""
  b, tq, h, d = q.shape
  _, tk, hk, _ = k.shape
  if k.shape != (b, tk, hk, d) or v.shape[:3] != (b, tk, hk) or h % hk:
    raise ValueError(
      f"expected q [b, tq, h, d], k [b, tk, hk, d], v [b, tk, hk, dv] with h % hk == 0; "
      f"got q {q.shape}, k {k.shape}, v {v.shape}"
    )
  bq, bkv = mask_info.block_q, mask_info.block_kv
  tq_pad, tk_pad = mask_info.num_q_blocks * bq, mask_info.num_kv_blocks * bkv
  if not (tq <= tq_pad < tq + bq and tk <= tk_pad < tk + bkv):
    raise ValueError(
      f"mask_info covers {mask_info.num_q_blocks} x {mask_info.num_kv_blocks} blocks of "
      f"({bq}, {bkv}), which does not fit q_len={tq}, kv_len={tk}"
    )
  if mask_info.mask_heads not in (1, h):
    raise ValueError(f"mask_info has {mask_info.mask_heads} heads; q has {h}")


def sinks_gradient(sinks, lse, delta, head_axis: int):
  """d loss / d sinks `[heads]` from row lse and delta = rowsum(dO * O) - dlse.

  A sink joins the denominator without a value: d lse / d sink = p_sink = exp(sink - lse),
  so d loss / d sink = -sum over rows of p_sink * delta. Rows with lse = -inf contribute 0.
  """
  shape = [1] * lse.ndim
  shape[head_axis] = -1
  live = jnp.isfinite(lse)
  p_sink = jnp.exp(sinks.reshape(shape) - jnp.where(live, lse, 0.0)) * live
  axes = tuple(a for a in range(lse.ndim) if a != head_axis)
  return -(p_sink * delta).sum(axis=axes)
