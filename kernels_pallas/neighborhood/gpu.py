"""Tile-sparse flash attention for GPUs (Pallas, Triton backend): the neighborhood kernel on GPU.

Same function and signature as `tpu.tile_sparse_attention` (plus Triton launch settings), and
equal to `attnjax.ops.neighborhood.reference.attention` on the windows its `TileSchedule`
encodes. The layout is the TPU kernel's: `T` consecutive rows form one 1-, 2- or 3-D spatial
tile (flattened row-major), and the schedule lists, per query tile, the key tiles its
neighborhoods reach, with a deduplicated boolean `[T, T]` tile per pair (it masks the window
edges, the dilation groups, the causal halves and the padding of partial tiles).

Why Triton rather than Mosaic GPU: each program walks a data-dependent number of key tiles at
scalar-loaded offsets, which Triton lowers to a plain loop over pointer offsets on every GPU
that JAX supports; Mosaic GPU (Hopper+) would need a hand-written warp-specialized pipeline
around those dynamic offsets. Triton wants power-of-two blocks: `T` must be a power of two
(`BlockSizes` gives power-of-two spatial tiles; positions past the map are masked by the
schedule), and head dims are zero-padded to a power of two >= 16 (zeros change neither the
logits nor the kept output columns).

Forward: one program per (batch, head, query tile) runs an online softmax over its key tiles
and saves the log-sum-exp. Backward: a dq kernel over the same lists, and a dk/dv kernel with
one program per (batch, kv head, key tile) walking the transposed list (the query tiles whose
neighborhoods reach that key tile: the inverse neighborhood) for each query head of its GQA
group, so K/V are never repeated. Probabilities are recomputed from the saved lse. Dots
take the input dtype's operands (bf16/f16 tensor cores) and accumulate in float32; float32
inputs follow `jax.default_matmul_precision` (TF32 by default on hardware, IEEE under
"highest", which the float32 tolerances need).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import common, triton
from kernels_pallas.neighborhood.common import TileSchedule, check_call
from kernels_pallas.triton import MIN_DOT, triton_call, whole


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Spatial tile shape of the GPU kernel: one power of two per spatial axis.

  A tile holds `T = prod(tile)` query (and key) rows; on hardware `T >= MIN_DOT`.
  """

  tile: tuple[int, ...]

  def __post_init__(self):
    if (
      not isinstance(self.tile, tuple)
      or not self.tile
      or not all(map(common.is_power_of_two, self.tile))
    ):
      raise ValueError(
        f"BlockSizes.tile must be a non-empty tuple of powers of two (one per spatial axis), "
        f"got tile={self.tile!r}"
      )

  @classmethod
  def covering(cls, tile: tuple[int, ...]) -> BlockSizes:
    """The power-of-two tile that rounds every edge of `tile` up."""
    return cls(tuple(common.next_power_of_two(t) for t in tile))

  def fit(self, extents: tuple[int, ...]) -> tuple[int, ...]:
    """Tile for a spatial grid of `extents`, still powers of two.

    Each edge is clipped to its axis rounded up to a power of two; then the last edge doubles
    until a tile has `MIN_DOT` rows (positions past the grid are masked padding).
    """
    if len(extents) != len(self.tile):
      raise ValueError(
        f"BlockSizes.tile needs one size per spatial axis {tuple(extents)}, got tile={self.tile}"
      )
    tile = [min(t, common.next_power_of_two(n)) for t, n in zip(self.tile, extents, strict=True)]
    while math.prod(tile) < MIN_DOT:
      tile[-1] *= 2
    return tuple(tile)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call (hashable: the `custom_vjp`'s non-differentiable argument)."""

  schedule: TileSchedule  # hashed by identity
  scale: float
  groups: int  # query heads per kv head
  interpret: bool
  num_warps: int
  num_stages: int

  @property
  def rows(self) -> int:
    """`T`, rows per tile."""
    return self.schedule.tile_size


# ---------------------------------------------------------------------------------------------
# Kernel bodies.


def _tile_rows(st, tile_index):
  """The `T` rows of tile `tile_index` along the sequence axis of a whole-sequence ref."""
  return pl.ds(pl.multiple_of(tile_index * st.rows, st.rows), st.rows)


def _probs_and_dlogits(st, q, k, v, d_out, allowed, lse, delta):
  """Recomputed probabilities and logit gradients (times scale), both `[Tq, Tk]` float32."""
  logits = common.dot(q, k, dtype=k.dtype, transpose_b=True) * st.scale
  safe_lse = jnp.where(lse == -jnp.inf, 0.0, lse)
  probs = jnp.where(allowed, jnp.exp(logits - safe_lse[:, None]), 0.0)
  d_probs = common.dot(d_out, v, dtype=v.dtype, transpose_b=True)
  return probs, probs * (d_probs - delta[:, None]) * st.scale


def _forward_kernel(
  kv_tiles_ref, kv_counts_ref, mask_ids_ref, masks_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
  *, st,
):  # fmt: skip
  i = pl.program_id(2)
  q = q_ref[...]

  def step(s, carry):
    acc, row_max, row_sum = carry
    kv_rows = _tile_rows(st, kv_tiles_ref[i, s])
    allowed = masks_ref[mask_ids_ref[i, s]] != 0
    logits = jnp.where(
      allowed,
      common.dot(q, k_ref[kv_rows, :], dtype=q.dtype, transpose_b=True) * st.scale,
      -jnp.inf,
    )
    new_max = jnp.maximum(row_max, logits.max(axis=1))
    shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
    probs = jnp.exp(logits - shift[:, None])
    correction = jnp.exp(row_max - shift)
    v = v_ref[kv_rows, :]
    acc = acc * correction[:, None] + common.dot(probs, v, dtype=v.dtype)
    return acc, new_max, row_sum * correction + probs.sum(axis=1)

  init = (
    jnp.zeros((st.rows, v_ref.shape[-1]), jnp.float32),
    jnp.full((st.rows,), -jnp.inf, jnp.float32),
    jnp.zeros((st.rows,), jnp.float32),
  )
  acc, row_max, row_sum = lax.fori_loop(0, kv_counts_ref[i], step, init)
  live = row_sum > 0
  safe_sum = jnp.where(live, row_sum, 1.0)
  o_ref[...] = (acc / safe_sum[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(live, row_max + jnp.log(safe_sum), -jnp.inf)


def _dq_kernel(
  kv_tiles_ref, kv_counts_ref, mask_ids_ref, masks_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
  delta_ref, dq_ref, *, st,
):  # fmt: skip
  i = pl.program_id(2)
  q, d_out, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def step(s, dq):
    kv_rows = _tile_rows(st, kv_tiles_ref[i, s])
    allowed = masks_ref[mask_ids_ref[i, s]] != 0
    k = k_ref[kv_rows, :]
    _, d_logits = _probs_and_dlogits(st, q, k, v_ref[kv_rows, :], d_out, allowed, lse, delta)
    return dq + common.dot(d_logits, k, dtype=k.dtype)

  dq = lax.fori_loop(0, kv_counts_ref[i], step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(
  q_tiles_ref, q_counts_ref, mask_ids_ref, masks_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
  delta_ref, dk_ref, dv_ref, *, st,
):  # fmt: skip
  j = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]

  def per_head(g, carry):
    def step(s, carry):
      dk, dv = carry
      q_rows = _tile_rows(st, q_tiles_ref[j, s])
      allowed = masks_ref[mask_ids_ref[j, s]] != 0  # query x key, like the forward tiles
      q, d_out = q_ref[g, q_rows, :], do_ref[g, q_rows, :]
      probs, d_logits = _probs_and_dlogits(
        st, q, k, v, d_out, allowed, lse_ref[g, q_rows], delta_ref[g, q_rows]
      )
      dv = dv + common.dot(probs, d_out, dtype=d_out.dtype, transpose_a=True)
      dk = dk + common.dot(d_logits, q, dtype=q.dtype, transpose_a=True)
      return dk, dv

    return lax.fori_loop(0, q_counts_ref[j], step, carry)

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = lax.fori_loop(0, st.groups, per_head, init)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------
# pallas_call wiring.


def _tables(schedule: TileSchedule, transposed: bool):
  """Scalar tables and int8 mask tiles, each read whole by every program."""
  if transposed:
    lists = (schedule.q_tiles, schedule.q_counts, schedule.mask_ids_t)
  else:
    lists = (schedule.kv_tiles, schedule.kv_counts, schedule.mask_ids)
  tables = [*(jnp.asarray(x, jnp.int32) for x in lists), jnp.asarray(schedule.mask_table, jnp.int8)]
  return tables, [whole(t.shape) for t in tables]


def _query_tile(st, width=None):
  """Block of one query tile (`[T, width]`, or `[T]` rows of lse / delta) of head `h`."""
  shape = (pl.squeezed, pl.squeezed, st.rows) + ((width,) if width else ())
  return pl.BlockSpec(shape, lambda b, h, i: (b, h, i) + ((0,) if width else ()))


def _kv_of_head(st, n, width):
  """Whole-sequence K or V block `[N, width]` of the kv head that query head `h` reads."""
  return pl.BlockSpec(
    (pl.squeezed, pl.squeezed, n, width), lambda b, h, i: (b, lax.div(h, st.groups), 0, 0)
  )


def _forward_call(st, q, k, v):
  batch, heads, n, head_dim = q.shape
  value_dim = v.shape[3]
  tables, table_specs = _tables(st.schedule, transposed=False)
  return triton_call(
    st,
    _forward_kernel,
    (batch, heads, st.schedule.num_tiles),
    [
      *table_specs,
      _query_tile(st, head_dim),
      _kv_of_head(st, n, head_dim),
      _kv_of_head(st, n, value_dim),
    ],
    [_query_tile(st, value_dim), _query_tile(st)],
    [
      jax.ShapeDtypeStruct((batch, heads, n, value_dim), q.dtype),
      jax.ShapeDtypeStruct((batch, heads, n), jnp.float32),
    ],
    "neighborhood_fwd_gpu",
  )(*tables, q, k, v)


def _dq_call(st, q, k, v, d_out, lse, delta):
  batch, heads, n, head_dim = q.shape
  value_dim = v.shape[3]
  tables, table_specs = _tables(st.schedule, transposed=False)
  in_specs = [
    *table_specs,
    _query_tile(st, head_dim),
    _kv_of_head(st, n, head_dim),
    _kv_of_head(st, n, value_dim),
    _query_tile(st, value_dim),
    _query_tile(st),
    _query_tile(st),
  ]
  return triton_call(
    st,
    _dq_kernel,
    (batch, heads, st.schedule.num_tiles),
    in_specs,
    _query_tile(st, head_dim),
    jax.ShapeDtypeStruct(q.shape, q.dtype),
    "neighborhood_dq_gpu",
  )(*tables, q, k, v, d_out, lse, delta)


def _dkv_call(st, q, k, v, d_out, lse, delta):
  batch, kv_heads, n, head_dim = k.shape
  value_dim = v.shape[3]
  tables, table_specs = _tables(st.schedule, transposed=True)

  def group_rows(width=None):
    """All `N` rows of the `groups` query heads that share kv head `h`."""
    shape = (pl.squeezed, st.groups, n) + ((width,) if width else ())
    return pl.BlockSpec(shape, lambda b, h, j: (b, h, 0) + ((0,) if width else ()))

  def key_tile(width):
    return pl.BlockSpec((pl.squeezed, pl.squeezed, st.rows, width), lambda b, h, j: (b, h, j, 0))

  in_specs = [
    *table_specs,
    group_rows(head_dim),
    key_tile(head_dim),
    key_tile(value_dim),
    group_rows(value_dim),
    group_rows(),
    group_rows(),
  ]
  return triton_call(
    st,
    _dkv_kernel,
    (batch, kv_heads, st.schedule.num_tiles),
    in_specs,
    [key_tile(head_dim), key_tile(value_dim)],
    [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    "neighborhood_dkv_gpu",
  )(*tables, q, k, v, d_out, lse, delta)


# ---------------------------------------------------------------------------------------------
# The public function.


def tile_sparse_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  schedule: TileSchedule,
  *,
  scale: float,
  interpret: bool = False,
  num_warps: int = 4,
  num_stages: int = 2,
) -> jax.Array:
  """`tpu.tile_sparse_attention` by Triton kernels; same arguments, shapes and result.

  `schedule.tile_size` must be a power of two, at least `MIN_DOT` unless interpreting;
  `interpret` runs the Pallas interpreter (any backend); `num_warps` are the warps per program
  and `num_stages` the software-pipelining depth of the loop over tiles.
  """
  check_call(q, k, v, schedule)
  triton.check_head_dims(interpret=interpret, head_dim=q.shape[-1], value_dim=v.shape[-1])
  rows = schedule.tile_size
  smallest = 1 if interpret else MIN_DOT
  if not common.is_power_of_two(rows) or rows < smallest:
    raise ValueError(
      f"schedule.tile_size (rows per tile) must be a power of two >= {smallest} for the Triton "
      f"kernel, got {rows}"
    )
  st = _Static(
    schedule=schedule,
    scale=float(scale),
    groups=q.shape[1] // k.shape[1],
    interpret=bool(interpret),
    num_warps=num_warps,
    num_stages=num_stages,
  )
  value_dim = v.shape[3]
  q, k, v = (_pad_last(x, common.next_power_of_two(x.shape[3], MIN_DOT)) for x in (q, k, v))
  out = _attention(st, q, k, v)
  return out[..., :value_dim]


def _pad_last(x: jax.Array, size: int) -> jax.Array:
  return jnp.pad(x, ((0, 0),) * 3 + ((0, size - x.shape[3]),))


# ---------------------------------------------------------------------------------------------
# custom_vjp wiring.


def _forward(st, q, k, v):
  out, lse = _forward_call(st, q, k, v)
  return out, (q, k, v, out, lse)


def _backward(st, residuals, d_out):
  q, k, v, out, lse = residuals
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)
  d_q = _dq_call(st, q, k, v, d_out, lse, delta)
  d_k, d_v = _dkv_call(st, q, k, v, d_out, lse, delta)
  return d_q, d_k, d_v


_attention = common.custom_vjp(_forward, _backward)
