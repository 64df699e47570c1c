"""Mask algebra for softmax attention, and its block-sparse analysis (`BlockMask`).

A `Mask` is a predicate `(head, q_pos, kv_pos) -> bool` over absolute positions, built from
constructors (`causal()`, `sliding_window(left, right)`, `chunked(size)`, `prefix_lm(n)`,
`sinks(n)`, `strided(stride)`, `power(base)`, `from_array(a)`, `block_pattern(bits, bq, bkv)`,
`documents(lengths)`, `per_head([...])`) and
combined with `&`, `|` and `~`. Query row `i` sits at absolute position `i + q_offset`
(decoding and cross attention use `q_offset != 0`); key column `j` at position `j`.

Besides pointwise evaluation every mask bounds whole tiles analytically (`_bounds`: may the
tile hold a True, must it be all True), so `block_mask` classifies the tiles of a
T = 1,048,576 causal mask without building the T x T matrix: only tiles whose bounds are
undecided are evaluated, and for masks that depend on `q_pos - kv_pos` alone, one tile per
distinct diagonal offset is evaluated.

Document masking (packed sequences) is dynamic data, not a static mask: see `SegmentIds`.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


class Mask(abc.ABC):
  """Base class of attention masks: a predicate over (head, query position, key position)."""

  num_heads: int | None = None  # None: the same mask for every head.
  diagonal_invariant: bool = False  # True when the predicate depends on q_pos - kv_pos only.
  # The largest q_pos - kv_pos the mask allows (None: unbounded or unknown); a decoder keeps
  # only that many past keys.
  lookback: int | None = None

  @abc.abstractmethod
  def _eval(self, h: np.ndarray, q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Boolean predicate on broadcastable integer arrays of heads and positions."""

  @abc.abstractmethod
  def _bounds(self, h, q_lo, q_hi, k_lo, k_hi) -> tuple[np.ndarray, np.ndarray]:
    """(may, must) for tiles [q_lo, q_hi) x [k_lo, k_hi) (non-empty ranges).

    `may` is False only when the tile is certainly all False; `must` is True only when it
    is certainly all True. Combinators may be conservative; `block_mask` resolves the rest.
    """

  def __call__(self, q_pos, kv_pos, head=0) -> np.ndarray:
    """Evaluates the predicate with numpy broadcasting."""
    return self._eval(np.asarray(head), np.asarray(q_pos), np.asarray(kv_pos))

  def on_arrays(self, q_pos, kv_pos, head=0):
    """Evaluates the predicate on jax arrays, positions that may be traced (decoding).

    Masks whose predicate is arithmetic on positions (causal, windows, chunks, key ranges
    and their combinations) support it; a mask that needs concrete positions raises jax's
    concretization error.
    """
    return self._eval(jnp.asarray(head), jnp.asarray(q_pos), jnp.asarray(kv_pos))

  def __and__(self, other: Mask) -> Mask:
    return And(self, other)

  def __or__(self, other: Mask) -> Mask:
    return Or(self, other)

  def __invert__(self) -> Mask:
    return Not(self)


def _diff_range(q_lo, q_hi, k_lo, k_hi):
  """Range [d_min, d_max] of q_pos - kv_pos over a tile."""
  return q_lo - (k_hi - 1), (q_hi - 1) - k_lo


@dataclasses.dataclass(frozen=True)
class Full(Mask):
  """Every query attends to every key (the identity of `&`)."""

  diagonal_invariant = True

  def _eval(self, h, q, k):
    return np.ones(np.broadcast_shapes(q.shape, k.shape), bool)

  def _bounds(self, h, q_lo, q_hi, k_lo, k_hi):
    shape = np.broadcast_shapes(np.shape(q_lo), np.shape(k_lo))
    return np.ones(shape, bool), np.ones(shape, bool)


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Mask):
  """Keys at positions q - left ... q + right (inclusive)."""

  left: int
  right: int
  diagonal_invariant = True
  lookback = property(lambda self: self.left)

  def _eval(self, h, q, k):
    d = q - k
    return (d <= self.left) & (d >= -self.right)

  def _bounds(self, h, q_lo, q_hi, k_lo, k_hi):
    d_min, d_max = _diff_range(q_lo, q_hi, k_lo, k_hi)
    may = (d_max >= -self.right) & (d_min <= self.left)
    must = (d_min >= -self.right) & (d_max <= self.left)
    return may, must


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
  """Keys at or before the query."""

  diagonal_invariant = True

  def _eval(self, h, q, k):
    return k <= q

  def _bounds(self, h, q_lo, q_hi, k_lo, k_hi):
    d_min, d_max = _diff_range(q_lo, q_hi, k_lo, k_hi)
    return d_max >= 0, d_min >= 0


@dataclasses.dataclass(frozen=True)
class Strided(Mask):
  """Keys whose distance to the query is a multiple of `stride` (Sparse Transformer)."""

  stride: int
  diagonal_invariant = True

  def _eval(self, h, q, k):
    return (q - k) % self.stride == 0

  def _bounds(self, h, q_lo, q_hi, k_lo, k_hi):
    d_min, d_max = _diff_range(q_lo, q_hi, k_lo, k_hi)
    may = (d_max // self.stride) * self.stride >= d_min
    must = np.broadcast_to(self.stride == 1, np.shape(may))
    return may, must


@dataclasses.dataclass(frozen=True)
class Power(Mask):
  """The query itself and keys at distances base**i before it (LogSparse, Li et al. 2019)."""

  base: int
  diagonal_invariant = True

  def _eval(self, h, q, k):
    d = q - k
    return (d == 0) | np.isin(d, self._powers(np.max(d, initial=1)))

  def _powers(self, upto: int) -> np.ndarray:
    count = 1 + max(0, math.ceil(math.log(max(int(upto), 1), self.base)) + 1)
    return self.base ** np.arange(count, dtype=np.int64)

  def _bounds(self, h, q_lo, q_hi, k_lo, k_hi):
    d_min, d_max = _diff_range(q_lo, q_hi, k_lo, k_hi)
    lo = np.maximum(d_min, 0)
    powers = self._powers(np.max(d_max, initial=1))
    hit = (lo[..., None] <= powers) & (powers <= d_max[..., None])
    may = (d_max >= 0) & ((lo == 0) | hit.any(-1))
    must = (d_min >= 0) & (d_max <= (2 if self.base == 2 else 1))
    return may, must


@dataclasses.dataclass(frozen=True)
class KeyRange(Mask):
  """Keys at positions lo <= kv_pos < hi, for every query (sinks, global tokens)."""

  lo: int
  hi: int

  def _eval(self, h, q, k):
    shape = np.broadcast_shapes(q.shape, k.shape)
    in_range = (k >= self.lo) & (k < self.hi)
    return (jnp if isinstance(in_range, jax.Array) else np).broadcast_to(in_range, shape)

  def _bounds(self, h, q_lo, q_hi, k_lo, k_hi):
    shape = np.broadcast_shapes(np.shape(q_lo), np.shape(k_lo))
    may = (k_hi > self.lo) & (k_lo < self.hi)
    must = (k_lo >= self.lo) & (k_hi <= self.hi)
    return np.broadcast_to(may, shape), np.broadcast_to(must, shape)


@dataclasses.dataclass(frozen=True)
class Chunked(Mask):
  """Query and key in the same chunk of `size` positions (Llama 4 chunked attention)."""

  size: int
  lookback = property(lambda self: self.size - 1)

  def _eval(self, h, q, k):
    return q // self.size == k // self.size

  def _bounds(self, h, q_lo, q_hi, k_lo, k_hi):
    s = self.size
    qc_lo, qc_hi, kc_lo, kc_hi = q_lo // s, (q_hi - 1) // s, k_lo // s, (k_hi - 1) // s
    may = (qc_hi >= kc_lo) & (kc_hi >= qc_lo)
    must = (qc_lo == qc_hi) & (kc_lo == kc_hi) & (qc_lo == kc_lo)
    return may, must


@dataclasses.dataclass(frozen=True, eq=False)
class FromArray(Mask):
  """An explicit boolean mask `[q, kv]` or per-head `[heads, q, kv]`; False outside it.

  Row `i` of the array is the query at absolute position `i`.
  """

  array: np.ndarray

  def __post_init__(self):
    padded = np.pad(self.array.astype(np.int64), [(0, 0)] * (self.array.ndim - 2) + [(1, 0)] * 2)
    object.__setattr__(self, "_summed_area", padded.cumsum(-2).cumsum(-1))

  @property
  def num_heads(self):
    return self.array.shape[0] if self.array.ndim == 3 else None

  def _lookup(self, table, h, q, k):
    return table[(h, q, k)] if self.array.ndim == 3 else table[(q, k)]

  def _eval(self, h, q, k):
    n_q, n_k = self.array.shape[-2:]
    inside = (q >= 0) & (q < n_q) & (k >= 0) & (k < n_k)
    h = np.broadcast_to(h, np.broadcast_shapes(h.shape, q.shape, k.shape))
    value = self._lookup(self.array, h, np.clip(q, 0, n_q - 1), np.clip(k, 0, n_k - 1))
    return inside & value

  def _bounds(self, h, q_lo, q_hi, k_lo, k_hi):
    n_q, n_k = self.array.shape[-2:]
    q0, q1 = np.clip(q_lo, 0, n_q), np.clip(q_hi, 0, n_q)
    k0, k1 = np.clip(k_lo, 0, n_k), np.clip(k_hi, 0, n_k)
    sat = self._summed_area
    count = (
      self._lookup(sat, h, q1, k1)
      - self._lookup(sat, h, q0, k1)
      - self._lookup(sat, h, q1, k0)
      + self._lookup(sat, h, q0, k0)
    )
    return count > 0, count == (q_hi - q_lo) * (k_hi - k_lo)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockPattern(Mask):
  """A boolean pattern over blocks: key j is visible to query i iff `bits[i // bq, j // bkv]`.

  The form of learned / routed block-sparse attention (MoBA, NSA block selection) and of the
  random block masks used to benchmark sparsity; it never expands to a dense matrix.
  """

  bits: np.ndarray
  block_q: int
  block_kv: int

  def __post_init__(self):
    padded = np.pad(self.bits.astype(np.int64), [(1, 0), (1, 0)])
    object.__setattr__(self, "_summed_area", padded.cumsum(0).cumsum(1))

  def _eval(self, h, q, k):
    n_q, n_k = self.bits.shape
    qb, kb = q // self.block_q, k // self.block_kv
    inside = (qb >= 0) & (qb < n_q) & (kb >= 0) & (kb < n_k)
    return inside & self.bits[np.clip(qb, 0, n_q - 1), np.clip(kb, 0, n_k - 1)]

  def _bounds(self, h, q_lo, q_hi, k_lo, k_hi):
    n_q, n_k = self.bits.shape
    q0, q1 = np.clip(q_lo // self.block_q, 0, n_q), np.clip(-(-q_hi // self.block_q), 0, n_q)
    k0, k1 = np.clip(k_lo // self.block_kv, 0, n_k), np.clip(-(-k_hi // self.block_kv), 0, n_k)
    sat = self._summed_area
    count = sat[q1, k1] - sat[q0, k1] - sat[q1, k0] + sat[q0, k0]
    return count > 0, count == (q1 - q0) * (k1 - k0)


@dataclasses.dataclass(frozen=True, eq=False)
class Documents(Mask):
  """Query and key in the same document, for documents of static `lengths` packed end to end.

  The static form of document (varlen) masking: unlike `segment_ids`, which are data, its
  BlockMask skips the tiles between documents. Positions past the last document match none.
  """

  starts: np.ndarray  # int64 [num_documents + 1]: cumulative document starts

  def _doc(self, pos):
    return np.searchsorted(self.starts, pos, side="right") - 1

  def _eval(self, h, q, k):
    end = self.starts[-1]
    return (self._doc(q) == self._doc(k)) & (q < end) & (k < end)

  def _bounds(self, h, q_lo, q_hi, k_lo, k_hi):
    end = self.starts[-1]
    q_first, q_last = self._doc(q_lo), self._doc(np.minimum(q_hi, end) - 1)
    k_first, k_last = self._doc(k_lo), self._doc(np.minimum(k_hi, end) - 1)
    inside = (q_lo < end) & (k_lo < end)
    may = inside & (q_first <= k_last) & (k_first <= q_last)
    must = inside & (q_first == q_last) & (k_first == k_last) & (q_first == k_first)
    must &= (q_hi <= end) & (k_hi <= end)
    return may, must


def _max_lookback(masks) -> int | None:
  """The lookback of a union: the largest, None if any is unbounded."""
  lookbacks = [m.lookback for m in masks]
  return None if None in lookbacks else max(lookbacks)


def _combined_heads(*masks: Mask) -> int | None:
  counts = {m.num_heads for m in masks} - {None}
  if len(counts) > 1:
    raise ValueError(f"cannot combine per-head masks with different head counts {sorted(counts)}")
  return counts.pop() if counts else None


@dataclasses.dataclass(frozen=True)
class _Binary(Mask):
  """A combination of two masks (`And`, `Or`)."""

  a: Mask
  b: Mask

  def __post_init__(self):
    _combined_heads(self.a, self.b)

  num_heads = property(lambda self: _combined_heads(self.a, self.b))
  diagonal_invariant = property(
    lambda self: self.a.diagonal_invariant and self.b.diagonal_invariant
  )


@dataclasses.dataclass(frozen=True)
class And(_Binary):
  lookback = property(
    lambda self: min((x for x in (self.a.lookback, self.b.lookback) if x is not None), default=None)
  )

  def _eval(self, h, q, k):
    return self.a._eval(h, q, k) & self.b._eval(h, q, k)

  def _bounds(self, *tile):
    (may_a, must_a), (may_b, must_b) = self.a._bounds(*tile), self.b._bounds(*tile)
    return may_a & may_b, must_a & must_b


@dataclasses.dataclass(frozen=True)
class Or(_Binary):
  lookback = property(lambda self: _max_lookback((self.a, self.b)))

  def _eval(self, h, q, k):
    return self.a._eval(h, q, k) | self.b._eval(h, q, k)

  def _bounds(self, *tile):
    (may_a, must_a), (may_b, must_b) = self.a._bounds(*tile), self.b._bounds(*tile)
    return may_a | may_b, must_a | must_b


@dataclasses.dataclass(frozen=True)
class Not(Mask):
  a: Mask

  num_heads = property(lambda self: self.a.num_heads)
  diagonal_invariant = property(lambda self: self.a.diagonal_invariant)

  def _eval(self, h, q, k):
    return ~self.a._eval(h, q, k)

  def _bounds(self, *tile):
    may, must = self.a._bounds(*tile)
    return ~must, ~may


@dataclasses.dataclass(frozen=True)
class PerHead(Mask):
  """Head `i` uses `masks[i]` (MoA, DuoAttention, S2-attention)."""

  masks: tuple[Mask, ...]

  num_heads = property(lambda self: len(self.masks))
  diagonal_invariant = property(lambda self: all(m.diagonal_invariant for m in self.masks))
  lookback = property(lambda self: _max_lookback(self.masks))

  def _eval(self, h, q, k):
    out = np.zeros(np.broadcast_shapes(h.shape, q.shape, k.shape), bool)
    for i, mask in enumerate(self.masks):
      out = np.where(h == i, mask._eval(h, q, k), out)
    return out

  def _bounds(self, h, *ranges):
    shape = np.broadcast_shapes(np.shape(h), *map(np.shape, ranges))
    may, must = np.zeros(shape, bool), np.zeros(shape, bool)
    for i, mask in enumerate(self.masks):
      may_i, must_i = mask._bounds(h, *ranges)
      may, must = np.where(h == i, may_i, may), np.where(h == i, must_i, must)
    return may, must


def _check_concrete(name: str, value) -> None:
  """Masks are static: their block analysis runs in numpy, outside any trace."""
  if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(value)):
    shape = getattr(value, "shape", None)
    raise ValueError(
      f"{name} is a traced value (shape {shape}) but masks are static: tile analysis "
      f"(`block_mask`) runs in numpy before compilation. Build the mask outside `jax.jit` "
      f"from concrete values and pass it in (closed over, or as a static argument); "
      f"for data-dependent masking pass `segment_ids`"
    )


def _check_nonneg_int(name: str, value, minimum: int = 0) -> int:
  _check_concrete(name, value)
  if isinstance(value, jax.Array | np.ndarray) and value.ndim == 0:
    value = value.item()
  if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
  return int(value)


def full() -> Mask:
  """No masking."""
  return Full()


def causal() -> Mask:
  """Query at position i attends keys 0 ... i."""
  return Causal()


def sliding_window(left: int, right: int = 0) -> Mask:
  """Query i attends keys i - left ... i + right inclusive (`local_window_size` of jax.nn).

  `sliding_window(w - 1)` is the causal window of w keys used by Mistral / Gemma.
  """
  return SlidingWindow(_check_nonneg_int("left", left), _check_nonneg_int("right", right))


def chunked(size: int) -> Mask:
  """Query and key in the same block of `size` positions; `causal() & chunked(n)` is Llama 4's."""
  return Chunked(_check_nonneg_int("size", size, minimum=1))


def prefix_lm(n: int) -> Mask:
  """Bidirectional over the first n positions, causal after them (T5 / PaLI prefix LM)."""
  return KeyRange(0, _check_nonneg_int("n", n)) | Causal()


def sinks(n: int) -> Mask:
  """Every query attends the first n keys (attention sinks; combine with `|`)."""
  return KeyRange(0, _check_nonneg_int("n", n))


def strided(stride: int) -> Mask:
  """Keys at distances that are multiples of `stride` (Child et al. 2019, Sparse Transformer)."""
  return Strided(_check_nonneg_int("stride", stride, minimum=1))


def power(base: int = 2) -> Mask:
  """The query and keys base**i positions before it (LogSparse attention, Li et al. 2019)."""
  return Power(_check_nonneg_int("base", base, minimum=2))


def from_array(mask: np.ndarray | jax.Array) -> Mask:
  """A concrete boolean mask `[q_len, kv_len]` or per-head `[heads, q_len, kv_len]`."""
  _check_concrete("mask", mask)
  array = np.asarray(mask)
  if array.dtype != bool or array.ndim not in (2, 3):
    raise ValueError(
      f"mask must be a boolean array [q_len, kv_len] or [heads, q_len, kv_len], "
      f"got dtype {array.dtype} shape {array.shape}"
    )
  return FromArray(array)


def block_pattern(bits: np.ndarray | jax.Array, block_q: int, block_kv: int) -> Mask:
  """Block-level boolean pattern `bits [q_blocks, kv_blocks]` over blocks of the given sizes."""
  _check_concrete("bits", bits)
  array = np.asarray(bits)
  if array.dtype != bool or array.ndim != 2:
    raise ValueError(
      f"bits must be a boolean [q_blocks, kv_blocks] array, got {array.dtype} {array.shape}"
    )
  return BlockPattern(
    array, _check_nonneg_int("block_q", block_q, 1), _check_nonneg_int("block_kv", block_kv, 1)
  )


def documents(lengths: Sequence[int]) -> Mask:
  """Block-diagonal mask of documents with the given lengths (static varlen packing)."""
  _check_concrete("lengths", lengths)
  lengths = np.asarray(lengths, np.int64)
  if lengths.ndim != 1 or len(lengths) == 0 or (lengths < 1).any():
    raise ValueError(f"lengths must be a non-empty list of positive ints, got {lengths.tolist()}")
  return Documents(np.concatenate([[0], np.cumsum(lengths)]))


def per_head(masks: Sequence[Mask]) -> Mask:
  """A different mask for every query head: head i uses masks[i]."""
  masks = tuple(masks)
  if not masks or any(m.num_heads is not None for m in masks):
    raise ValueError("per_head needs a non-empty list of head-independent masks")
  return PerHead(masks)


def _positions(q_len: int, kv_len: int, q_offset: int):
  q_pos = np.arange(q_len, dtype=np.int64)[:, None] + q_offset
  kv_pos = np.arange(kv_len, dtype=np.int64)[None, :]
  return q_pos, kv_pos


def to_dense(mask: Mask | None, q_len: int, kv_len: int, *, q_offset: int = 0) -> np.ndarray:
  """The boolean mask `[q_len, kv_len]`, or `[heads, q_len, kv_len]` for per-head masks."""
  mask = mask if mask is not None else Full()
  q_pos, kv_pos = _positions(q_len, kv_len, q_offset)
  if mask.num_heads is None:
    return np.broadcast_to(mask._eval(np.zeros((), np.int64), q_pos, kv_pos), (q_len, kv_len))
  heads = np.arange(mask.num_heads)[:, None, None]
  return np.broadcast_to(
    mask._eval(heads, q_pos[None], kv_pos[None]), (mask.num_heads, q_len, kv_len)
  )


@dataclasses.dataclass(frozen=True)
class SegmentIds:
  """Segment ids of packed sequences: query i attends key j only if their ids are equal.

  Attributes:
    q: int `[batch, q_len]`.
    kv: int `[batch, kv_len]`; None means the same as `q` (self attention).
    padding_id: tokens with this id attend to nothing and are attended by nothing.
  """

  q: jax.Array
  kv: jax.Array | None = None
  padding_id: int | None = None

  @property
  def kv_ids(self) -> jax.Array:
    return self.q if self.kv is None else self.kv

  def allowed(self, q_ids: jax.Array, kv_ids: jax.Array) -> jax.Array:
    """`[..., q, kv]` boolean from `q_ids [..., q]` and `kv_ids [..., kv]`."""
    same = q_ids[..., :, None] == kv_ids[..., None, :]
    if self.padding_id is not None:
      same &= (q_ids != self.padding_id)[..., :, None]
    return same


jax.tree_util.register_dataclass(SegmentIds, data_fields=["q", "kv"], meta_fields=["padding_id"])


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["kv_counts", "kv_indices", "kv_kinds", "partial_ids", "partial_tiles"],
  meta_fields=["q_len", "kv_len", "block_q", "block_kv", "q_offset"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class BlockMask:
  """Tile-level analysis of a mask: which kv blocks each query block visits.

  Rows are query blocks of `block_q` positions (lengths are padded up to whole blocks; padded
  keys and queries are never attended), columns kv blocks of `block_kv`.

  Attributes:
    kv_counts: int32 `[mask_heads, num_q_blocks]`, the number of kv blocks to visit.
    kv_indices: int32 `[mask_heads, num_q_blocks, max_count]`, the kv block ids in increasing
      order; entries past `kv_counts` repeat the last id (so a kernel re-uses its last DMA).
    kv_kinds: int8, same shape: `FULL` (no mask needed), `PARTIAL`, or `EMPTY` for padding.
    partial_ids: int32, same shape: index into `partial_tiles` for PARTIAL entries, else 0.
    partial_tiles: bool `[num_partial, block_q, block_kv]`, each distinct partial tile once
      (one all-False tile when there is none).
    mask_heads: 1, or the number of heads of a per-head mask.
  """

  kv_counts: np.ndarray
  kv_indices: np.ndarray
  kv_kinds: np.ndarray
  partial_ids: np.ndarray
  partial_tiles: np.ndarray
  q_len: int
  kv_len: int
  block_q: int
  block_kv: int
  q_offset: int = 0

  @property
  def mask_heads(self) -> int:
    return self.kv_counts.shape[0]

  @property
  def num_q_blocks(self) -> int:
    return self.kv_counts.shape[1]

  @property
  def num_kv_blocks(self) -> int:
    return -(-self.kv_len // self.block_kv)

  @property
  def density(self) -> float:
    """Visited tiles / all tiles."""
    return float(self.kv_counts.sum()) / (self.mask_heads * self.num_q_blocks * self.num_kv_blocks)

  def tile_kinds(self) -> np.ndarray:
    """int8 `[mask_heads, num_q_blocks, num_kv_blocks]` of EMPTY / PARTIAL / FULL."""
    kinds = np.zeros((self.mask_heads, self.num_q_blocks, self.num_kv_blocks), np.int8)
    h, qb, slot = np.nonzero(np.arange(self.kv_indices.shape[-1]) < self.kv_counts[..., None])
    kinds[h, qb, self.kv_indices[h, qb, slot]] = self.kv_kinds[h, qb, slot]
    return kinds

  def to_dense(self) -> np.ndarray:
    """The boolean mask `[mask_heads, q_len, kv_len]` this BlockMask encodes (for tests)."""
    bq, bkv = self.block_q, self.block_kv
    dense = np.zeros((self.mask_heads, self.num_q_blocks * bq, self.num_kv_blocks * bkv), bool)
    h, qb, slot = np.nonzero(np.arange(self.kv_indices.shape[-1]) < self.kv_counts[..., None])
    for hi, qi, si in zip(h, qb, slot, strict=True):
      ki, kind = self.kv_indices[hi, qi, si], self.kv_kinds[hi, qi, si]
      tile = True if kind == FULL else self.partial_tiles[self.partial_ids[hi, qi, si]]
      dense[hi, qi * bq : (qi + 1) * bq, ki * bkv : (ki + 1) * bkv] = tile
    return dense[:, : self.q_len, : self.kv_len]

  def transpose(self) -> BlockMask:
    """The BlockMask of the transposed mask: per kv block, the query blocks that see it.

    Backward kernels computing dk/dv iterate over it. `q_offset` is kept for reference only:
    rows of the result are kv blocks.
    """
    kinds = self.tile_kinds().transpose(0, 2, 1)
    tile_ids = np.zeros(kinds.shape, np.int32)
    h, qb, slot = np.nonzero(
      (np.arange(self.kv_indices.shape[-1]) < self.kv_counts[..., None])
      & (self.kv_kinds == PARTIAL)
    )
    tile_ids[h, self.kv_indices[h, qb, slot], qb] = self.partial_ids[h, qb, slot]
    return _from_tile_kinds(
      kinds,
      tile_ids,
      self.partial_tiles.transpose(0, 2, 1),
      q_len=self.kv_len,
      kv_len=self.q_len,
      block_q=self.block_kv,
      block_kv=self.block_q,
      q_offset=self.q_offset,
    )


def _from_tile_kinds(kinds, tile_ids, partial_tiles, **meta) -> BlockMask:
  """Builds the sparse per-row lists from dense `[heads, rows, cols]` tile kinds."""
  active = kinds != EMPTY
  counts = active.sum(-1).astype(np.int32)
  max_count = max(int(counts.max(initial=0)), 1)
  order = np.argsort(~active, axis=-1, kind="stable")[..., :max_count]
  slot_valid = np.arange(max_count) < counts[..., None]
  last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], -1)
  indices = np.where(slot_valid, order, last).astype(np.int32)
  kv_kinds = np.where(slot_valid, np.take_along_axis(kinds, order, -1), EMPTY).astype(np.int8)
  partial_ids = np.where(kv_kinds == PARTIAL, np.take_along_axis(tile_ids, order, -1), 0)
  return BlockMask(counts, indices, kv_kinds, partial_ids.astype(np.int32), partial_tiles, **meta)


_TILES_PER_EVAL = 16


def block_mask(
  mask: Mask | None,
  q_len: int,
  kv_len: int,
  block_q: int,
  block_kv: int,
  *,
  q_offset: int = 0,
) -> BlockMask:
  """Classifies every (query block, kv block) tile of `mask` as empty, partial or full.

  Works from the masks' analytic tile bounds: the dense `[q_len, kv_len]` matrix is never
  built. Lengths are padded up to whole blocks; padded positions are never attended.
  """
  for name, value in (("q_len", q_len), ("kv_len", kv_len)):
    _check_nonneg_int(name, value, minimum=1)
  for name, value in (("block_q", block_q), ("block_kv", block_kv)):
    _check_nonneg_int(name, value, minimum=1)
  mask = mask if mask is not None else Full()
  mask_heads = mask.num_heads or 1
  n_qb, n_kb = -(-q_len // block_q), -(-kv_len // block_kv)
  heads = np.arange(mask_heads, dtype=np.int64)[:, None, None]
  q_lo = np.arange(n_qb, dtype=np.int64)[None, :, None] * block_q
  k_lo = np.arange(n_kb, dtype=np.int64)[None, None, :] * block_kv
  q_hi, k_hi = np.minimum(q_lo + block_q, q_len), np.minimum(k_lo + block_kv, kv_len)
  may, must = mask._bounds(heads, q_lo + q_offset, q_hi + q_offset, k_lo, k_hi)
  shape = (mask_heads, n_qb, n_kb)
  may, must = np.broadcast_to(may, shape), np.broadcast_to(must, shape)
  padded = (q_hi - q_lo < block_q) | (k_hi - k_lo < block_kv)
  must = must & ~padded
  kinds = np.where(must, FULL, np.where(may, PARTIAL, EMPTY)).astype(np.int8)
  tile_ids = np.zeros(shape, np.int32)
  tiles = _resolve_partial_tiles(mask, kinds, tile_ids, q_len, kv_len, block_q, block_kv, q_offset)
  return _from_tile_kinds(
    kinds,
    tile_ids,
    tiles,
    q_len=q_len,
    kv_len=kv_len,
    block_q=block_q,
    block_kv=block_kv,
    q_offset=q_offset,
  )


def _resolve_partial_tiles(mask, kinds, tile_ids, q_len, kv_len, block_q, block_kv, q_offset):
  """Evaluates the undecided tiles in place: reclassifies them and dedupes their contents."""
  h, qb, kb = np.nonzero(kinds == PARTIAL)
  if mask.diagonal_invariant:
    # Unpadded tiles on the same diagonal offset (and head) have equal contents.
    boundary = ((qb + 1) * block_q > q_len) | ((kb + 1) * block_kv > kv_len)
    key = np.where(boundary, np.arange(len(h)), qb * block_q - kb * block_kv)
    _, first, inverse = np.unique(
      np.stack([h, boundary, key]), axis=1, return_index=True, return_inverse=True
    )
  else:
    first, inverse = np.arange(len(h)), np.arange(len(h))
  q_rows = np.arange(block_q)[None, :, None]
  k_cols = np.arange(block_kv)[None, None, :]
  seen: dict[bytes, int] = {}
  distinct: list[np.ndarray] = []
  rep_kind = np.zeros(len(first), np.int8)
  rep_id = np.zeros(len(first), np.int32)
  for start in range(0, len(first), _TILES_PER_EVAL):
    idx = first[start : start + _TILES_PER_EVAL]
    q_pos = qb[idx, None, None] * block_q + q_rows
    k_pos = kb[idx, None, None] * block_kv + k_cols
    values = mask._eval(h[idx, None, None], q_pos + q_offset, k_pos)
    values = np.broadcast_to(values, (len(idx), block_q, block_kv)) & (q_pos < q_len)
    values &= k_pos < kv_len
    for i, tile in enumerate(values):
      n = start + i
      if not tile.any():
        rep_kind[n] = EMPTY
      elif tile.all():
        rep_kind[n] = FULL
      else:
        rep_kind[n] = PARTIAL
        rep_id[n] = seen.setdefault(np.packbits(tile).tobytes(), len(distinct))
        if rep_id[n] == len(distinct):
          distinct.append(tile)
  kinds[h, qb, kb] = rep_kind[inverse]
  tile_ids[h, qb, kb] = rep_id[inverse]
  if not distinct:
    return np.zeros((1, block_q, block_kv), bool)
  return np.stack(distinct)
