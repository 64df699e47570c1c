"""Tile-sparse flash attention for TPU (Mosaic): the kernel of local / neighborhood attention.

The sequence is laid out tile-major (`T` consecutive rows form one multi-dimensional spatial
tile) and a static `TileSchedule` lists, for every query tile, the key tiles it reaches and a
boolean tile per (query tile, key tile) pair, deduplicated in `mask_table`. The forward kernel
walks that list with an online softmax (grid `[batch, kv_heads, query tiles, steps]`, the key
tile of each step chosen by scalar-prefetched indices); each step's K/V block is fetched once
for the query tiles of all the query heads of its GQA group. The backward pass is two
kernels, one over the same list for dq (grouped the same way) and one over the transposed
list for dk and dv (GQA heads summed in the grid, key-major tiles). Joined by
`jax.custom_vjp`; `interpret=True` (or `pltpu.InterpretParams()`) runs it on CPU. Tile sizes
are the schedule's: `T` rows per tile, a multiple of 8 (sublanes) on hardware. Every call sets
its VMEM limit from its blocks and its cost estimate from the schedule.

The schedule is computed by `attnjax.ops.neighborhood.window.tile_plan`, and the kernel must
equal `attnjax.ops.neighborhood.reference.attention` on the same windows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import common, tpu_memory
from kernels_pallas.neighborhood.common import NN, NT, TileSchedule, check_call

LANES = 128  # m and l scratch rows are lane-replicated: [T, 128], not [T, 1] columns


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call (hashable: the `custom_vjp`'s non-differentiable argument)."""

  schedule: TileSchedule  # hashed by identity
  scale: float
  interpret: bool | pltpu.InterpretParams


# ---------------------------------------------------------------------------------------------
# Kernel bodies. The forward and dq kernels hold the query tiles of a kv head's whole GQA group
# (refs `[groups, T, dim]`) against one K/V block, and loop over the group's heads.


def _allowed(mask):
  """int8 mask tile -> bool. Widened to int32 first: v4's Mosaic cannot compare 8-bit
  vectors; the int32 copy of a 128 x 128 tile is 64 KiB of VMEM, under 0.5% of any
  generation's."""
  return mask.astype(jnp.int32) != 0


def _probs(st: _Static, a, b, allowed, lse):
  """Recomputed probabilities of one tile pair from the saved log-sum-exp: `a` the query tile
  and `lse` a column `[Tq, 1]` (query-major `[Tq, Tk]`), or `a` the key tile and `lse` a row
  `[1, Tq]` (key-major `[Tk, Tq]`)."""
  logits = lax.dot_general(a, b, NT, preferred_element_type=jnp.float32) * st.scale
  safe_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  return jnp.where(allowed, jnp.exp(jnp.where(allowed, logits, 0.0) - safe_lse), 0.0)


def _over_group(groups, head_step):
  """Runs `head_step(g)` for the query heads g = 0 .. groups - 1 of one GQA group."""

  def step(g, carry):
    head_step(g)
    return carry

  lax.fori_loop(0, groups, step, 0)


def _forward_kernel(
  kv_ref, counts_ref, ids_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc,
  *, st,
):  # fmt: skip
  del kv_ref, ids_ref  # used by the index maps
  i, s = pl.program_id(2), pl.program_id(3)
  groups, tile = q_ref.shape[:2]

  @pl.when(s == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(s < counts_ref[i])
  def _step():
    allowed = _allowed(mask_ref[...])
    k, v = k_ref[...], v_ref[...]

    def head_step(g):
      logits = lax.dot_general(q_ref[g], k, NT, preferred_element_type=jnp.float32)
      logits = jnp.where(allowed, logits * st.scale, -jnp.inf)
      m_prev = m_sc[g][:, :1]
      m_new = jnp.maximum(m_prev, logits.max(-1, keepdims=True))
      shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      probs = jnp.where(allowed, jnp.exp(logits - shift), 0.0)
      alpha = jnp.exp(m_prev - shift)
      l_new = alpha * l_sc[g][:, :1] + probs.sum(-1, keepdims=True)
      l_sc[g] = jnp.broadcast_to(l_new, (tile, LANES))
      pv = lax.dot_general(probs.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
      acc_sc[g] = alpha * acc_sc[g] + pv
      m_sc[g] = jnp.broadcast_to(m_new, (tile, LANES))

    _over_group(groups, head_step)

  @pl.when(s == pl.num_programs(3) - 1)
  def _finish():
    def head_finish(g):
      denom = l_sc[g][:, :1]
      safe_denom = jnp.where(denom > 0, denom, 1.0)
      o_ref[g] = (acc_sc[g] / safe_denom).astype(o_ref.dtype)
      lse_ref[g] = jnp.where(denom > 0, m_sc[g][:, :1] + jnp.log(safe_denom), -jnp.inf)

    _over_group(groups, head_finish)


def _dq_kernel(
  kv_ref, counts_ref, ids_ref, q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref,
  dq_ref, dq_sc, *, st,
):  # fmt: skip
  del kv_ref, ids_ref  # used by the index maps
  i, s = pl.program_id(2), pl.program_id(3)

  @pl.when(s == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(s < counts_ref[i])
  def _step():
    allowed = _allowed(mask_ref[...])
    k, v = k_ref[...], v_ref[...]

    def head_step(g):
      probs = _probs(st, q_ref[g], k, allowed, lse_ref[g])
      d_probs = lax.dot_general(do_ref[g], v, NT, preferred_element_type=jnp.float32)
      d_logits = probs * (d_probs - delta_ref[g])
      dq_sc[g] += st.scale * lax.dot_general(
        d_logits.astype(k.dtype), k, NN, preferred_element_type=jnp.float32
      )

    _over_group(q_ref.shape[0], head_step)

  @pl.when(s == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_sc[...]


def _dkv_kernel(
  qt_ref, counts_ref, ids_ref, q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref,
  dk_ref, dv_ref, dk_sc, dv_sc, *, st,
):  # fmt: skip
  del qt_ref, ids_ref  # used by the index maps
  j, g, s = pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((g == 0) & (s == 0))
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(s < counts_ref[j])
  def _step():
    # Key-major [Tk, Tq] tiles (transposed masks): lse and delta arrive as lane-dense rows and
    # both updates are plain [Tk, Tq] x [Tq, dim] matmuls.
    q, d_out = q_ref[...], do_ref[...]
    probs = _probs(st, k_ref[...], q, _allowed(mask_ref[...]), lse_ref[...])
    dv_sc[...] += lax.dot_general(
      probs.astype(d_out.dtype), d_out, NN, preferred_element_type=jnp.float32
    )
    d_probs = lax.dot_general(v_ref[...], d_out, NT, preferred_element_type=jnp.float32)
    d_logits = probs * (d_probs - delta_ref[...])
    dk_sc[...] += st.scale * lax.dot_general(
      d_logits.astype(q.dtype), q, NN, preferred_element_type=jnp.float32
    )

  @pl.when((g == pl.num_programs(3) - 1) & (s == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[...] = dk_sc[...]
    dv_ref[...] = dv_sc[...]


# ---------------------------------------------------------------------------------------------
# pallas_call wiring.


def _tables(schedule: TileSchedule, transposed: bool):
  """(Scalar-prefetched tile lists, int8 mask tiles `[num_masks, T, T]`, query x key or, for
  the transposed lists, key x query).

  The lists are flat (1-D arrays pad least in SMEM); int8 masks move a quarter of the bytes of
  int32 per tile.
  """
  if transposed:
    lists = (schedule.q_tiles, schedule.q_counts, schedule.mask_ids_t)
    masks = np.swapaxes(schedule.mask_table, 1, 2)
  else:
    lists = (schedule.kv_tiles, schedule.kv_counts, schedule.mask_ids)
    masks = schedule.mask_table
  prefetch = [jnp.asarray(x, jnp.int32).reshape(-1) for x in lists]
  return prefetch, jnp.asarray(masks, jnp.int8)


def _by_group(x, kv_heads):
  """`[batch, heads, N, dim]` -> `[batch, kv_heads, groups, N, dim]` (a free reshape)."""
  batch, heads, n, dim = x.shape
  return x.reshape(batch, kv_heads, heads // kv_heads, n, dim)


def _by_head(x):
  batch, kv_heads, groups, n, dim = x.shape
  return x.reshape(batch, kv_heads * groups, n, dim)


def _as_rows(column, tile):
  """`[batch, heads, N, 1]` -> `[batch, heads, N / T, 1, T]`: one lane-dense row per tile."""
  batch, heads, n, _ = column.shape
  return column.reshape(batch, heads, n // tile, 1, tile)


def _specs_over_kv_lists(st: _Static, groups, head_dim, value_dim):
  """Grid `[batch, kv_heads, query tiles, steps]` walking each query tile's key tiles.

  Returns (`group_rows(width)`: the `[groups, T, width]` block of the query tile's GQA group,
  [k, v, mask] blocks of the step).
  """
  tile, steps = st.schedule.tile_size, st.schedule.kv_tiles.shape[1]

  def kv_map(b, h, i, s, kv, counts, ids):
    return b, h, kv[i * steps + s], 0

  def mask_map(b, h, i, s, kv, counts, ids):
    return ids[i * steps + s], 0, 0

  def group_rows(width):
    return pl.BlockSpec(
      (pl.Squeezed(), pl.Squeezed(), groups, tile, width), lambda b, h, i, *_: (b, h, 0, i, 0)
    )

  step_specs = [
    pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), tile, head_dim), kv_map),
    pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), tile, value_dim), kv_map),
    pl.BlockSpec((pl.Squeezed(), tile, tile), mask_map),
  ]
  return group_rows, step_specs


def _pallas_call(kernel, st: _Static, *, grid, sequential, specs, inputs, width, cost, name):
  """One Mosaic call over `grid` with scalar-prefetched tables, its last `sequential` dims
  accumulating ("arbitrary") and the others parallel. `specs` = (in_specs, out_specs,
  out_shape, scratch `(shape, dtype)`s), `inputs` = (prefetched tables, operands); the VMEM
  limit counts a few live [T, T] and [T, `width`] float32 values."""
  in_specs, out_specs, out_shape, scratch = specs
  prefetch, operands = inputs
  tile = st.schedule.tile_size
  semantics = ("parallel",) * (len(grid) - sequential) + ("arbitrary",) * sequential
  blocks = tpu_memory.spec_blocks([*in_specs, *out_specs], [*operands, *out_shape])
  temporaries = 4 * (6 * tile * tile + 4 * tile * width)
  return pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(prefetch),
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM(shape, dtype) for shape, dtype in scratch],
    ),
    out_shape=out_shape,
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=semantics,
      vmem_limit_bytes=tpu_memory.vmem_limit_bytes(blocks, scratch, temporaries),
    ),
    cost_estimate=cost,
    interpret=st.interpret,
    name=name,
  )(*prefetch, *operands)


def _cost(st: _Static, q, *, transposed, contracted, step_bytes, call_bytes):
  """Cost of one call: per real step and query head, [T, T] matmuls contracting `contracted`
  dims in all and T * T exponentials; `step_bytes` fetched per real step, `call_bytes` once."""
  batch, heads = q.shape[:2]
  counts = st.schedule.q_counts if transposed else st.schedule.kv_counts
  head_steps = int(counts.sum()) * batch * heads
  tile = st.schedule.tile_size
  return pl.CostEstimate(
    flops=head_steps * 2 * tile * tile * contracted,
    transcendentals=head_steps * tile * tile,
    bytes_accessed=call_bytes + int(counts.sum()) * batch * step_bytes,
  )


def _kv_step_bytes(st: _Static, k, v, kv_heads):
  """K, V and mask tiles of one step, fetched once per kv head (shared by its GQA group)."""
  tile = st.schedule.tile_size
  return kv_heads * tile * (k.shape[3] * k.dtype.itemsize + v.shape[3] * v.dtype.itemsize + tile)


def _forward_call(st: _Static, q, k, v):
  batch, kv_heads, n, head_dim = k.shape
  groups, value_dim = q.shape[1] // kv_heads, v.shape[3]
  tile = st.schedule.tile_size
  group_rows, step_specs = _specs_over_kv_lists(st, groups, head_dim, value_dim)
  prefetch, mask_table = _tables(st.schedule, transposed=False)
  out_shape = [
    jax.ShapeDtypeStruct((batch, kv_heads, groups, n, value_dim), q.dtype),
    jax.ShapeDtypeStruct((batch, kv_heads, groups, n, 1), jnp.float32),
  ]
  in_specs = [group_rows(head_dim), *step_specs]
  # lse stays a column: written once per query tile, never per step.
  out_specs = [group_rows(value_dim), group_rows(1)]
  scratch = [((groups, tile, LANES), jnp.float32)] * 2 + [((groups, tile, value_dim), jnp.float32)]
  operands = (_by_group(q, kv_heads), k, v, mask_table)
  out, lse = _pallas_call(
    functools.partial(_forward_kernel, st=st),
    st,
    grid=(batch, kv_heads, st.schedule.num_tiles, st.schedule.kv_tiles.shape[1]),
    sequential=1,
    specs=(in_specs, out_specs, out_shape, scratch),
    inputs=(prefetch, operands),
    width=max(head_dim, value_dim),
    cost=_cost(
      st,
      q,
      transposed=False,
      contracted=head_dim + value_dim,
      step_bytes=_kv_step_bytes(st, k, v, kv_heads),
      call_bytes=tpu_memory.nbytes(q, *out_shape),
    ),
    name="neighborhood_fwd",
  )
  return _by_head(out), _by_head(lse)


def _dq_call(st: _Static, q, k, v, d_out, lse, delta):
  batch, kv_heads, n, head_dim = k.shape
  groups, value_dim = q.shape[1] // kv_heads, v.shape[3]
  tile = st.schedule.tile_size
  group_rows, step_specs = _specs_over_kv_lists(st, groups, head_dim, value_dim)
  prefetch, mask_table = _tables(st.schedule, transposed=False)
  out_shape = jax.ShapeDtypeStruct((batch, kv_heads, groups, n, head_dim), jnp.float32)
  # lse and delta columns are fetched once per query tile (their block is the same every step).
  in_specs = [
    group_rows(head_dim),
    *step_specs,
    group_rows(value_dim),
    group_rows(1),
    group_rows(1),
  ]
  scratch = [((groups, tile, head_dim), jnp.float32)]
  operands = (
    _by_group(q, kv_heads), k, v, mask_table, *(_by_group(x, kv_heads) for x in (d_out, lse, delta))
  )  # fmt: skip
  (d_q,) = _pallas_call(
    functools.partial(_dq_kernel, st=st),
    st,
    grid=(batch, kv_heads, st.schedule.num_tiles, st.schedule.kv_tiles.shape[1]),
    sequential=1,
    specs=(in_specs, [group_rows(head_dim)], [out_shape], scratch),
    inputs=(prefetch, operands),
    width=max(head_dim, value_dim),
    cost=_cost(
      st,
      q,
      transposed=False,
      contracted=2 * head_dim + value_dim,
      step_bytes=_kv_step_bytes(st, k, v, kv_heads),
      call_bytes=tpu_memory.nbytes(q, d_out, lse, delta, out_shape),
    ),
    name="neighborhood_dq",
  )
  return _by_head(d_q)


def _dkv_call(st: _Static, q, k, v, d_out, lse, delta):
  """Grid `[batch, kv_heads, key tiles, groups, steps]`: each key tile walks the query tiles of
  each query head of its GQA group; its K/V blocks stay put over the group and the steps."""
  batch, kv_heads, n, head_dim = k.shape
  groups, value_dim = q.shape[1] // kv_heads, v.shape[3]
  tile, steps = st.schedule.tile_size, st.schedule.q_tiles.shape[1]

  def kv_map(b, h, j, g, s, qt, counts, ids):
    return b, h, j, 0

  def q_map(b, h, j, g, s, qt, counts, ids):
    return b, h * groups + g, qt[j * steps + s], 0

  def row_map(b, h, j, g, s, qt, counts, ids):
    return b, h * groups + g, qt[j * steps + s], 0, 0

  def mask_map(b, h, j, g, s, qt, counts, ids):
    return ids[j * steps + s], 0, 0

  def key_rows(width):
    return pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), tile, width), kv_map)

  def query_rows(width):
    return pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), tile, width), q_map)

  lse_row = pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), pl.Squeezed(), 1, tile), row_map)
  prefetch, mask_table = _tables(st.schedule, transposed=True)
  in_specs = [
    query_rows(head_dim), key_rows(head_dim), key_rows(value_dim),
    pl.BlockSpec((pl.Squeezed(), tile, tile), mask_map), query_rows(value_dim), lse_row, lse_row,
  ]  # fmt: skip
  out_specs = [key_rows(head_dim), key_rows(value_dim)]
  out_shape = [
    jax.ShapeDtypeStruct((batch, kv_heads, n, head_dim), jnp.float32),
    jax.ShapeDtypeStruct((batch, kv_heads, n, value_dim), jnp.float32),
  ]
  scratch = [((tile, head_dim), jnp.float32), ((tile, value_dim), jnp.float32)]
  operands = (q, k, v, mask_table, d_out, _as_rows(lse, tile), _as_rows(delta, tile))
  itemsize = q.dtype.itemsize
  return _pallas_call(
    functools.partial(_dkv_kernel, st=st),
    st,
    grid=(batch, kv_heads, st.schedule.num_tiles, groups, steps),
    sequential=2,
    specs=(in_specs, out_specs, out_shape, scratch),
    inputs=(prefetch, operands),
    width=max(head_dim, value_dim),
    cost=_cost(
      st,
      q,
      transposed=True,
      contracted=2 * (head_dim + value_dim),
      step_bytes=q.shape[1] * tile * ((head_dim + value_dim) * itemsize + 8 + tile),
      call_bytes=tpu_memory.nbytes(k, v, *out_shape),
    ),
    name="neighborhood_dkv",
  )


# ---------------------------------------------------------------------------------------------
# The public function.


def tile_sparse_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  schedule: TileSchedule,
  *,
  scale: float,
  interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
  """Softmax attention of each query tile over its scheduled key tiles.

  Args:
    q: `[batch, heads, N, head_dim]`, N = `schedule.num_tiles * schedule.tile_size`.
    k: `[batch, kv_heads, N, head_dim]`; `heads % kv_heads == 0`.
    v: `[batch, kv_heads, N, value_dim]`.
    schedule: the static tile lists (see `TileSchedule`).
    scale: logit scale.
    interpret: run in the Pallas interpreter (True, or `pltpu.InterpretParams()`).

  Returns:
    `[batch, heads, N, value_dim]` in q's dtype; a row with no allowed key is zero.
  """
  check_call(q, k, v, schedule)
  return _attention(_Static(schedule=schedule, scale=float(scale), interpret=interpret), q, k, v)


# ---------------------------------------------------------------------------------------------
# custom_vjp wiring.


def _forward(st, q, k, v):
  out, lse = _forward_call(st, q, k, v)
  return out, (q, k, v, out, lse)


def _backward(st, residuals, d_out):
  q, k, v, out, lse = residuals
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
  d_q = _dq_call(st, q, k, v, d_out, lse, delta)
  d_k, d_v = _dkv_call(st, q, k, v, d_out, lse, delta)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


_attention = common.custom_vjp(_forward, _backward)
