"""Pieces shared by the block-sparse kernels: block sizes, the tile lists they iterate over, the
static settings of a call, argument checks, the kernels' operands and the backward pass around
their dq and dk/dv kernels.

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
  """Query and kv rows per tile, of the kernels and of the XLA blockwise path.

  Each backend adds its rules (`tpu.check_block_sizes`, `gpu.check_block_sizes`).
  """

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


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything static about one call (hashable: the `custom_vjp`'s non-differentiable argument)."""

  scale: float
  softcap: float | None
  has_segments: bool
  padding_id: int | None
  has_sinks: bool
  per_head: bool
  groups: int  # query heads per kv head
  block_q: int
  block_kv: int
  interpret: object  # bool, or `pltpu.InterpretParams` for the TPU kernels

  @classmethod
  def of_call(cls, q, k, mask_info: MaskInfo, *, scale, softcap, segment_ids, padding_id, sinks,
              interpret):  # fmt: skip
    """The settings of a `block_sparse_attention` call (arguments as it takes them)."""
    return cls(
      scale=float(scale),
      softcap=None if softcap is None else float(softcap),
      has_segments=segment_ids is not None,
      padding_id=padding_id,
      has_sinks=sinks is not None,
      per_head=mask_info.mask_heads > 1,
      groups=q.shape[2] // k.shape[2],
      block_q=mask_info.block_q,
      block_kv=mask_info.block_kv,
      interpret=interpret,
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


def kernel_operands(q, k, v, mask_info: MaskInfo, segment_ids, sinks, head_dims=None):
  """The kernels' operands `(info, q, k, v, sinks, q_seg, kv_seg)` of a call.

  q, k, v heads-major `[batch, heads, padded_len, dim]`: lengths zero-padded to whole blocks and,
  when `head_dims = (d, dv)` is given, head dims zero-padded to those; `q_seg`, `kv_seg` int32
  `[batch, padded_len]` (None without segment ids); `sinks` float32 `[heads]` (zeros without
  sinks); `info` the MaskInfo with its lists as device arrays.
  """
  q_len_padded = mask_info.num_q_blocks * mask_info.block_q
  kv_len_padded = mask_info.num_kv_blocks * mask_info.block_kv
  d, dv = head_dims or (q.shape[3], v.shape[3])

  def heads_major(x, length, width):
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, width - x.shape[3])))
    return x.transpose(0, 2, 1, 3)

  q_seg = kv_seg = None
  if segment_ids is not None:
    q_ids, kv_ids = (jnp.asarray(x, jnp.int32) for x in segment_ids)
    q_seg = jnp.pad(q_ids, ((0, 0), (0, q_len_padded - q_ids.shape[1])))
    kv_seg = jnp.pad(kv_ids, ((0, 0), (0, kv_len_padded - kv_ids.shape[1])))
  sinks = jnp.zeros((q.shape[2],), jnp.float32) if sinks is None else sinks.astype(jnp.float32)
  return (
    jax.tree.map(jnp.asarray, mask_info),
    heads_major(q, q_len_padded, d),
    heads_major(k, kv_len_padded, d),
    heads_major(v, kv_len_padded, dv),
    sinks,
    q_seg,
    kv_seg,
  )


def backward(dq_call, dkv_call, st, residuals, cotangents):
  """The `custom_vjp` backward of both backends, given their dq and dk/dv `pallas_call`s.

  `residuals` are `(info, q, k, v, sinks, q_seg, kv_seg, out, lse)` in the kernels' heads-major
  layout; returns the cotangents of `(info, q, k, v, sinks, q_seg, kv_seg)`.
  """
  info, q, k, v, sinks, q_seg, kv_seg, out, lse = residuals
  d_out, d_lse = cotangents
  d_out = d_out.astype(out.dtype)  # the kernels' matmul operands stay in the input dtype
  # FA-2: dS = P (dP - delta), delta = rowsum(dO * O); an lse cotangent contributes P * dlse.
  delta = (d_out.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1).reshape(lse.shape)
  delta = delta - d_lse
  dq = dq_call(st, info, q, k, v, d_out, lse, delta, q_seg, kv_seg)
  dk, dv = dkv_call(st, info, q, k, v, d_out, lse, delta, q_seg, kv_seg)
  d_sinks = sinks_gradient(sinks, lse, delta, 1) if st.has_sinks else jnp.zeros_like(sinks)
  return None, dq, dk, dv, d_sinks, None, None
