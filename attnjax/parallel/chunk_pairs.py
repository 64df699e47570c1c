"""Softmax attention of one query chunk against one key/value chunk, at absolute positions.

Ring and all-gather attention compute, on each device, attention between a local query chunk
and a key/value chunk that starts elsewhere in the sequence, then merge partial results by
their log-sum-exp. Masks are predicates over absolute positions, so a chunk pair is described
statically by where its chunks start (`ChunkPair`): it is `EMPTY` (skipped), `FULL` (no mask)
or `PARTIAL` (the global mask seen through `ShiftedMask`). Which pair a device computes
depends on its index, a traced value inside `shard_map`; `switch_pairs` compiles each distinct
pair once and selects it with `lax.switch`, so every branch keeps a static block-sparse
schedule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib


class ShiftedMask(masks_lib.Mask):
  """`mask` with query row i at position `i + q_shift` and key column j at `j + kv_shift`.

  Not a dataclass on purpose: the op's array-mask shape check looks through dataclass fields
  and would compare a wrapped `from_array` mask with the local chunk's shape.
  """

  def __init__(self, mask: masks_lib.Mask, q_shift: int, kv_shift: int):
    self.mask, self.q_shift, self.kv_shift = mask, int(q_shift), int(kv_shift)

  @property
  def num_heads(self):
    return self.mask.num_heads

  @property
  def diagonal_invariant(self):
    return self.mask.diagonal_invariant

  def _eval(self, h, q, k):
    return self.mask._eval(h, q + self.q_shift, k + self.kv_shift)

  def _bounds(self, h, q_lo, q_hi, k_lo, k_hi):
    qs, ks = self.q_shift, self.kv_shift
    return self.mask._bounds(h, q_lo + qs, q_hi + qs, k_lo + ks, k_hi + ks)

  def _key(self):
    return (self.mask, self.q_shift, self.kv_shift)

  def __eq__(self, other):
    return isinstance(other, ShiftedMask) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())


@dataclasses.dataclass(frozen=True)
class ChunkPair:
  """What a query chunk at `q_start` computes against a kv chunk at `kv_start` (static)."""

  kind: int  # masks_lib.EMPTY / PARTIAL / FULL
  mask: masks_lib.Mask | None  # the local mask of a PARTIAL pair, else None


def classify(
  mask: masks_lib.Mask | None, q_start: int, q_len: int, kv_start: int, kv_len: int
) -> ChunkPair:
  """The pair of query positions `[q_start, +q_len)` and key positions `[kv_start, +kv_len)`."""
  if mask is None:
    return ChunkPair(masks_lib.FULL, None)
  heads = np.arange(mask.num_heads or 1).reshape(-1, 1, 1)
  may, must = mask._bounds(
    heads,
    np.full((1, 1, 1), q_start),
    np.full((1, 1, 1), q_start + q_len),
    np.full((1, 1, 1), kv_start),
    np.full((1, 1, 1), kv_start + kv_len),
  )
  if not np.any(may):
    return ChunkPair(masks_lib.EMPTY, None)
  if np.all(must):
    return ChunkPair(masks_lib.FULL, None)
  if mask.diagonal_invariant:  # only the offset matters: equal offsets share one branch
    offset = q_start - kv_start
    return ChunkPair(masks_lib.PARTIAL, ShiftedMask(mask, max(offset, 0), max(-offset, 0)))
  return ChunkPair(masks_lib.PARTIAL, ShiftedMask(mask, q_start, kv_start))


def pair_attention(
  pair: ChunkPair,
  op: Callable,
  op_kwargs: dict,
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  segment_ids: masks_lib.SegmentIds | None,
) -> tuple[jax.Array, jax.Array]:
  """(out `[b, tq, h, dv]` in q's dtype, float32 lse `[b, tq, h]`) of one chunk pair."""
  if pair.kind == masks_lib.EMPTY:
    b, tq, h, _ = q.shape
    out = jnp.zeros((b, tq, h, v.shape[-1]), q.dtype)
    return out, jnp.full((b, tq, h), -jnp.inf, jnp.float32)
  return op(q, k, v, mask=pair.mask, segment_ids=segment_ids, return_lse=True, **op_kwargs)


def switch_pairs(
  pairs: Sequence[ChunkPair],
  device: jax.Array,
  op: Callable,
  op_kwargs: dict,
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  segment_ids: masks_lib.SegmentIds | None,
) -> tuple[jax.Array, jax.Array]:
  """`pair_attention(pairs[device], ...)`, each distinct pair compiled once."""
  distinct = list(dict.fromkeys(pairs))
  branches = [
    lambda q, k, v, seg, pair=pair: pair_attention(pair, op, op_kwargs, q, k, v, seg)
    for pair in distinct
  ]
  if len(branches) == 1:
    return branches[0](q, k, v, segment_ids)
  index = jnp.asarray([distinct.index(p) for p in pairs], jnp.int32)[device]
  return jax.lax.switch(index, branches, q, k, v, segment_ids)


def merge(
  out_a: jax.Array, lse_a: jax.Array, out_b: jax.Array, lse_b: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Softmax over the union of two key sets from the parts' (out, lse); float32 out."""
  lse = jnp.logaddexp(lse_a, lse_b)
  shift = jnp.where(jnp.isfinite(lse), lse, 0.0)
  weight_a, weight_b = jnp.exp(lse_a - shift), jnp.exp(lse_b - shift)
  out = weight_a[..., None] * out_a.astype(jnp.float32)
  return out + weight_b[..., None] * out_b.astype(jnp.float32), lse


def add_sinks(out: jax.Array, lse: jax.Array, sinks: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Joins per-head sink logits `sinks [heads]` to the softmax denominator of (out, lse)."""
  sink = sinks.astype(jnp.float32)
  shift = jnp.maximum(jnp.where(jnp.isfinite(lse), lse, sink), sink)
  new_lse = shift + jnp.log(jnp.exp(lse - shift) + jnp.exp(sink - shift))
  scaled = out.astype(jnp.float32) * jnp.exp(lse - new_lse)[..., None]
  return scaled.astype(out.dtype), new_lse


def local_segments(
  q_ids: jax.Array | None, kv_ids: jax.Array | None, padding_id: int | None
) -> masks_lib.SegmentIds | None:
  return None if q_ids is None else masks_lib.SegmentIds(q_ids, kv_ids, padding_id)


@dataclasses.dataclass(frozen=True)
class SoftmaxCall:
  """A `dot_product_attention` call split into chunk pairs (static and hashable, for jit).

  `options` (scale, softcap, impl, block_sizes as sorted items) are passed to every chunk's
  call; sinks are joined after merging (`add_sinks`), since every partial result would count
  them.
  """

  op: Callable
  mask: masks_lib.Mask | None
  options: tuple[tuple[str, object], ...]
  q_offset: int
  padding_id: int | None

  @property
  def op_kwargs(self) -> dict:
    return dict(self.options)
