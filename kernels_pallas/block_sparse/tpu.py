"""Block-sparse flash attention for TPU (Pallas Mosaic): forward, dq and dk/dv kernels.

Equals `attnjax.ops.softmax.reference.attention` (the float32 oracle) on the mask that the
`MaskInfo` encodes. Per query block, the forward grid walks only the kv blocks listed for it;
FULL tiles run without any mask arithmetic, PARTIAL tiles apply their deduplicated int8 tile,
EMPTY tiles are never fetched or computed (grid steps past a row's count do nothing and, since
the padded ids repeat the last one, copy nothing). The online softmax (FlashAttention-2, Dao
2023) keeps its running max / sum in VMEM scratch replicated over the 128 lanes.

GQA: with a mask shared by the heads, a forward / dq q block holds several query heads of one
kv head's group (all of them when `MAX_GROUP_ROWS` and VMEM allow), flattened into one
`[heads * bq, d]` matmul operand, so each K/V tile is fetched once for all of them.

Backward recomputes probabilities from the saved log-sum-exp: the dq kernel walks the forward
lists; the dk/dv kernel walks the transposed lists (per kv block, the query blocks that see
it) and loops over the query heads of a GQA group in the grid, so K/V are never repeated. It
computes transposed tiles `[bkv, bq]`, so the per-step lse, delta and query ids are lane-dense
rows and both of its gradient matmuls take untransposed operands. Matmul operands stay in the
input dtype (bf16 on the MXU), accumulating in float32.

Each kernel reads one scalar-prefetched step table (`StepTable`): per grid step one int32
packing the step's kind, its block and the mask tile to have in VMEM. That tile is carried
forward over FULL / EMPTY steps, so a partial tile is fetched only when the next partial step
needs another one. The tables must fit SMEM (1 MiB on every generation): a call whose table
does not is split into calls over consecutive row ranges, each table under `TABLE_SMEM_BYTES`,
each writing its rows of the full-size outputs in place (aliased to the previous call's).

Layout inside: `[batch, heads, seq, dim]` (the wrapper transposes); lse / delta as
`[batch, heads, seq, 1]` columns for the forward and dq kernels (read once per query row) and
`[batch, heads, 1, seq]` rows for dk/dv; a tile's row segment ids as a `[batch, seq, 1]`
column, its column ids as a `[batch, 1, seq]` row.
Mosaic kernels are not auto-partitioned: inside `shard_map` they run on each shard.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import common, tpu_memory
from kernels_pallas.block_sparse.common import (
  FULL,
  PARTIAL,
  BlockSizes,
  MaskInfo,
  Static,
  backward,
  check_call,
  kernel_operands,
)

LANES = 128
SMEM_BYTES = 1 << 20  # every generation, v4 to TPU7x
# A call's step table may take this much; the rest is left for sinks and Mosaic's own scalars.
TABLE_SMEM_BYTES = 3 * SMEM_BYTES // 4
KIND_BITS = 2  # EMPTY, PARTIAL, FULL
# Rows of a forward / dq q block holding several query heads of a GQA group (heads x block_q).
MAX_GROUP_ROWS = 1024


def check_block_sizes(block_sizes: BlockSizes, q_len_padded: int, kv_len_padded: int) -> None:
  """Raises ValueError unless the tiles satisfy Mosaic's (8, 128) block-shape rule.

  `block_q % 128 == 0` (the dk/dv kernel's transposed tiles put query rows on lanes) and
  `block_kv % 128 == 0`, or one block spans the whole padded length.
  """
  if block_sizes.block_q % 128 and block_sizes.block_q != q_len_padded:
    raise ValueError(
      f"block_q={block_sizes.block_q} must be a multiple of 128 on TPU (the dk/dv kernel puts "
      f"query rows on lanes) or equal the padded q length {q_len_padded}"
    )
  if block_sizes.block_kv % 128 and block_sizes.block_kv != kv_len_padded:
    raise ValueError(
      f"block_kv={block_sizes.block_kv} must be a multiple of 128 on TPU or equal the padded kv "
      f"length {kv_len_padded}"
    )


# ---------------------------------------------------------------------------------------------
# Step tables: what each grid step does, one int32 in SMEM.


@dataclasses.dataclass(frozen=True)
class StepTable:
  """Static shape of one call's step table, a flat int32 array in grid order.

  The table is `[outer, rows, inner, steps]` flattened: `outer` is the mask head (forward, dq)
  or kv head (dk/dv), `inner` the query head within a GQA group (dk/dv with per-head masks),
  `rows` the call's query blocks (forward, dq) or kv blocks (dk/dv) from `row_start`, `steps`
  the listed blocks per row. Entry = kind | block << 2 | tile << (2 + block_bits).
  `computed`: its FULL and PARTIAL steps (all steps when the table is traced).
  """

  outer: int
  row_start: int
  rows: int
  inner: int
  steps: int
  block_bits: int
  computed: int

  @property
  def smem_bytes(self) -> int:
    return 4 * self.outer * self.rows * self.inner * self.steps

  def entry(self, table_ref, outer, row, inner, step):
    """The packed entry of a grid step (`row` counted from `row_start`)."""
    return table_ref[((outer * self.rows + row) * self.inner + inner) * self.steps + step]

  def kind(self, entry):
    return entry & ((1 << KIND_BITS) - 1)

  def block(self, entry):
    return jax.lax.shift_right_logical(entry, KIND_BITS) & ((1 << self.block_bits) - 1)

  def tile(self, entry):
    return jax.lax.shift_right_logical(entry, KIND_BITS + self.block_bits)


def _block_bits(num_blocks: int, num_tiles: int) -> int:
  """Bits for a block id; raises ValueError when block and tile ids do not fit one int32."""
  bits = max(1, (num_blocks - 1).bit_length())
  tile_bits = 31 - KIND_BITS - bits
  if num_tiles > 1 << tile_bits:
    raise ValueError(
      f"{num_tiles} distinct partial mask tiles over {num_blocks} blocks do not fit the "
      f"kernel's int32 step entries (at most {1 << tile_bits} tiles); use larger blocks"
    )
  return bits


def _is_traced(*arrays) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in arrays)


def _pack(start, rows, inner, steps, block_bits, kinds, blocks, tile_ids):
  """Layout and flat int32 table from `[outer, rows, inner, steps]` kinds, block ids and partial
  tile ids (numpy when they are concrete, so a concrete mask costs no device work).

  Non-partial steps name the last partial tile before them in grid order (the first one of
  the table before any), so the tile's block index changes only where a new tile is needed.
  """
  xp, running_max = (jnp, jax.lax.cummax) if _is_traced(kinds) else (np, np.maximum.accumulate)
  outer = kinds.shape[0]
  kinds, blocks, tile_ids = (xp.asarray(x, xp.int32).reshape(-1) for x in (kinds, blocks, tile_ids))
  is_partial = kinds == PARTIAL
  position = xp.arange(kinds.size, dtype=xp.int32)
  last_partial = running_max(xp.where(is_partial, position, -1))
  last_partial = xp.where(last_partial < 0, xp.argmax(is_partial), last_partial)
  table = kinds | (blocks << KIND_BITS) | (tile_ids[last_partial] << (KIND_BITS + block_bits))
  computed = kinds.size if xp is jnp else int((kinds != 0).sum())
  return StepTable(outer, start, rows, inner, steps, block_bits, computed), table


def _row_ranges(table_bytes_per_row: int, num_rows: int, what: str) -> list[tuple[int, int]]:
  """Consecutive row ranges whose tables each fit `TABLE_SMEM_BYTES`."""
  rows_per_call = TABLE_SMEM_BYTES // table_bytes_per_row
  if rows_per_call == 0:
    raise ValueError(
      f"one row of the {what} step table takes {table_bytes_per_row} bytes of SMEM, more than "
      f"the {TABLE_SMEM_BYTES} of the {SMEM_BYTES}-byte SMEM a call may use; use larger blocks"
    )
  return [(r, min(r + rows_per_call, num_rows)) for r in range(0, num_rows, rows_per_call)]


def _steps_in(counts, start: int, stop: int, listed: int) -> int:
  """Grid steps the rows `[start, stop)` need: their longest list when the counts are known."""
  if _is_traced(counts):
    return listed
  return max(1, int(np.asarray(counts)[:, start:stop].max()))


def forward_tables(info: MaskInfo) -> list[tuple[StepTable, jax.Array]]:
  """Forward / dq step tables (rows: query blocks), one per call."""
  outer, num_rows, listed = info.indices.shape
  bits = _block_bits(info.num_kv_blocks, info.tiles.shape[0])
  tables = []
  for start, stop in _row_ranges(4 * outer * listed, num_rows, "forward"):
    steps = _steps_in(info.counts, start, stop, listed)
    rows = (slice(None), slice(start, stop), None, slice(0, steps))
    arrays = (x[rows] for x in (info.kinds, info.indices, info.partial_ids))
    tables.append(_pack(start, stop - start, 1, steps, bits, *arrays))
  return tables


def dkv_tables(info: MaskInfo, heads: int, kv_heads: int) -> list[tuple[StepTable, jax.Array]]:
  """dk/dv step tables (rows: kv blocks, in the dk/dv grid's order), one per call."""
  per_head = info.mask_heads > 1
  outer, inner = (kv_heads, heads // kv_heads) if per_head else (1, 1)
  num_rows, listed = info.t_indices.shape[1:]
  bits = _block_bits(info.num_q_blocks, info.tiles.shape[0])

  def grid_order(x):  # [mask_heads, rows, steps] -> [outer, rows, inner, steps]
    return x.reshape(outer, inner, num_rows, listed).transpose(0, 2, 1, 3)

  tables = []
  for start, stop in _row_ranges(4 * outer * inner * listed, num_rows, "dk/dv"):
    steps = _steps_in(info.t_counts, start, stop, listed)
    rows = (slice(None), slice(start, stop), slice(None), slice(0, steps))
    arrays = (grid_order(x)[rows] for x in (info.t_kinds, info.t_indices, info.t_partial_ids))
    tables.append(_pack(start, stop - start, inner, steps, bits, *arrays))
  return tables


def table_smem_bytes(info: MaskInfo, heads: int, kv_heads: int) -> dict[str, list[int]]:
  """SMEM bytes of each call's step table: {"forward": [...], "dkv": [...]} (dq as forward)."""
  return {
    "forward": [layout.smem_bytes for layout, _ in forward_tables(info)],
    "dkv": [layout.smem_bytes for layout, _ in dkv_tables(info, heads, kv_heads)],
  }


# ---------------------------------------------------------------------------------------------
# Kernel bodies.


def _matmul(a, b, contracting):
  """float32-accumulated `a . b` over `contracting` (lhs axis, rhs axis), operands as given."""
  return jax.lax.dot_general(a, b, (contracting, ((), ())), preferred_element_type=jnp.float32)


def _logits(st: _Static, rows, cols):
  """Scaled (and capped) logits `rows . cols^T` in float32: `[bq, bkv]` from (q, k), or the
  transpose `[bkv, bq]` from (k, q); and the cap's tanh for the backward."""
  s = _matmul(rows, cols, ((1,), (1,))) * st.scale
  if st.softcap is None:
    return s, None
  capped = jnp.tanh(s / st.softcap)
  return st.softcap * capped, capped


def _stacked(x, heads: int):
  """`x` repeated `heads` times along its rows: one copy per query head of a grouped q block."""
  return x if heads == 1 else jnp.concatenate([x] * heads, axis=0)


def _flat_rows(ref):
  """A `[heads, rows, width]` block as one `[heads * rows, width]` operand."""
  x = ref[...]
  return x.reshape(-1, x.shape[-1])


class _Mask(NamedTuple):
  """What masks a tile in a kernel: the int8 tile ref, the segment-id refs of the tile's rows
  (a column) and columns (a row), whether the rows are queries (False in the transposed dk/dv
  kernel), and the query heads stacked in a q block (the tile and row ids repeat per head)."""

  tile: object
  row_ids: object
  col_ids: object
  queries_are_rows: bool = True
  heads: int = 1


def _allowed(st: _Static, apply_tile: bool, mask: _Mask):
  """Boolean tile of allowed pairs, or None when everything is allowed."""
  # Widened before comparing: v4's VPU has no int8 compare; the tile stays int8 in HBM / VMEM.
  allowed = None
  if apply_tile:
    allowed = _stacked(mask.tile[...].astype(jnp.int32), mask.heads) != 0
  if st.has_segments:
    row_ids, col_ids = _stacked(mask.row_ids[...], mask.heads), mask.col_ids[...]
    same = row_ids == col_ids
    if st.padding_id is not None:
      same = same & ((row_ids if mask.queries_are_rows else col_ids) != st.padding_id)
    allowed = same if allowed is None else allowed & same
  return allowed


def _split_refs(st: _Static, refs, n_main: int, with_sinks: bool):
  """Splits the kernel refs: main inputs, row and column segment ids, mask tile, sinks, the
  rest (outputs, scratch)."""
  main, rest = list(refs[:n_main]), list(refs[n_main:])
  row_ids = col_ids = sinks = None
  if st.has_segments:
    row_ids, col_ids = rest.pop(0), rest.pop(0)
  tile = rest.pop(0)
  if with_sinks and st.has_sinks:
    sinks = rest.pop(0)
  return main, row_ids, col_ids, tile, sinks, rest


def _forward_kernel(table_ref, *refs, st: _Static, layout: StepTable):
  (q_ref, k_ref, v_ref), row_ids, col_ids, tile_ref, sinks_ref, rest = _split_refs(
    st, refs, 3, with_sinks=True
  )
  o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
  heads, bq = q_ref.shape[:2]
  head_block, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  kind = layout.kind(layout.entry(table_ref, head_block if st.per_head else 0, i, 0, j))
  mask = _Mask(tile_ref, row_ids, col_ids, heads=heads)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def update(apply_tile: bool):
    s, _ = _logits(st, _flat_rows(q_ref), k_ref[...])
    allowed = _allowed(st, apply_tile, mask)
    if allowed is not None:
      s = jnp.where(allowed, s, -jnp.inf)
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - shift[:, :1])
    correction = jnp.exp(m_prev - shift)
    l_scr[...] = correction * l_scr[...] + p.sum(axis=1, keepdims=True)
    m_scr[...] = m_new
    v = v_ref[...]
    acc_scr[...] = acc_scr[...] * correction[:, :1] + _matmul(p.astype(v.dtype), v, ((1,), (0,)))

  pl.when(kind == FULL)(lambda: update(apply_tile=False))
  pl.when(kind == PARTIAL)(lambda: update(apply_tile=True))

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    m, total = m_scr[...][:, :1], l_scr[...][:, :1]
    shift = jnp.where(m == -jnp.inf, 0.0, m)
    if st.has_sinks:
      first = head_block * heads
      sink = [jnp.full((bq, 1), sinks_ref[first + g], jnp.float32) for g in range(heads)]
      total = total + jnp.exp(jnp.concatenate(sink, axis=0) - shift)
    live = total > 0
    safe_total = jnp.where(live, total, 1.0)
    o_ref[...] = (acc_scr[...] / safe_total).reshape(o_ref.shape).astype(o_ref.dtype)
    lse = jnp.where(live, jnp.log(safe_total) + shift, -jnp.inf)
    lse_ref[...] = lse.reshape(lse_ref.shape)


def _probs_and_dlogits(st: _Static, apply_tile, logit_operands, dp_operands, lse, delta, mask):
  """Recomputed probabilities and d loss / d (q k^T) (scale applied), float32, oriented as
  `logit_operands`: (q, k) gives `[bq, bkv]` with lse / delta columns `[bq, 1]`; (k, q) the
  transpose `[bkv, bq]` with lse / delta rows `[1, bq]`. `dp_operands`: (do, v) or (v, do)."""
  s, capped = _logits(st, *logit_operands)
  p = jnp.exp(s - jnp.where(lse == -jnp.inf, 0.0, lse))
  allowed = _allowed(st, apply_tile, mask)
  if allowed is not None:
    p = jnp.where(allowed, p, 0.0)
  ds = p * (_matmul(*dp_operands, ((1,), (1,))) - delta)
  if capped is not None:
    ds = ds * (1.0 - capped * capped)
  return p, ds * st.scale


def _dq_kernel(table_ref, *refs, st: _Static, layout: StepTable):
  main, row_ids, col_ids, tile_ref, _, rest = _split_refs(st, refs, 6, with_sinks=False)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = main
  dq_ref, dq_scr = rest
  head_block, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  kind = layout.kind(layout.entry(table_ref, head_block if st.per_head else 0, i, 0, j))
  mask = _Mask(tile_ref, row_ids, col_ids, heads=q_ref.shape[0])

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  def update(apply_tile: bool):
    k = k_ref[...]
    _, ds = _probs_and_dlogits(
      st, apply_tile, (_flat_rows(q_ref), k), (_flat_rows(do_ref), v_ref[...]),
      _flat_rows(lse_ref), _flat_rows(delta_ref), mask,
    )  # fmt: skip
    dq_scr[...] += _matmul(ds.astype(k.dtype), k, ((1,), (0,)))

  pl.when(kind == FULL)(lambda: update(apply_tile=False))
  pl.when(kind == PARTIAL)(lambda: update(apply_tile=True))

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_scr[...].reshape(dq_ref.shape).astype(dq_ref.dtype)


def _dkv_kernel(table_ref, *refs, st: _Static, layout: StepTable):
  """Works on transposed tiles `[bkv, bq]`: lse, delta and query ids arrive as lane-dense rows
  `[1, bq]`, and both gradient matmuls take their operands untransposed."""
  main, row_ids, col_ids, tile_ref, _, rest = _split_refs(st, refs, 6, with_sinks=False)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = main
  dk_ref, dv_ref, dk_scr, dv_scr = rest
  kv_head, kb, g, jt = pl.program_id(1), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  outer, inner = (kv_head, g) if st.per_head else (0, 0)
  kind = layout.kind(layout.entry(table_ref, outer, kb, inner, jt))
  mask = _Mask(tile_ref, row_ids, col_ids, queries_are_rows=False)

  @pl.when((g == 0) & (jt == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def update(apply_tile: bool):
    q, do = q_ref[...], do_ref[...]
    p_t, ds_t = _probs_and_dlogits(
      st, apply_tile, (k_ref[...], q), (v_ref[...], do), lse_ref[...], delta_ref[...], mask
    )
    dv_scr[...] += _matmul(p_t.astype(do.dtype), do, ((1,), (0,)))
    dk_scr[...] += _matmul(ds_t.astype(q.dtype), q, ((1,), (0,)))

  pl.when(kind == FULL)(lambda: update(apply_tile=False))
  pl.when(kind == PARTIAL)(lambda: update(apply_tile=True))

  @pl.when((g == pl.num_programs(3) - 1) & (jt == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------
# pallas_call wiring.


class _Call(NamedTuple):
  """One pallas_call: its grid (the last `sequential` dims accumulate, "arbitrary"; the others
  are parallel), `specs` = (in_specs, out_specs, out_shape, scratch), its operands after the
  step table, the logits tile (rows, cols) of a grid step, how many float32 tiles of that
  shape a step keeps live, and its cost estimate."""

  grid: tuple[int, ...]
  sequential: int
  specs: tuple
  operands: list
  logits_tile: tuple[int, int]
  live_tiles: int
  cost: pl.CostEstimate


def _compiler_params(call: _Call) -> pltpu.CompilerParams:
  """Semantics and VMEM limit (blocks, scratch and the live float32 logits tiles). Raises
  ValueError when it exceeds the smallest VMEM."""
  in_specs, out_specs, out_shape, scratch = call.specs
  semantics = ("parallel",) * (len(call.grid) - call.sequential) + ("arbitrary",) * call.sequential
  temporaries = call.live_tiles * tpu_memory.vmem_bytes(call.logits_tile, jnp.float32)
  return tpu_memory.compiler_params(
    semantics, in_specs, call.operands, out_specs, out_shape, scratch, temporaries
  )


def _pallas_call(kernel, st: _Static, call: _Call, table, name: str, into=None):
  """Runs `call` with its step table scalar-prefetched. Its outputs span every row; it writes
  only its own. `into`: the outputs of the call over the previous rows, updated in place
  (aliased, never read), so the calls of a split table need no concatenation."""
  in_specs, out_specs, out_shape, scratch = call.specs
  operands = list(call.operands)
  aliases = {}
  if into is not None:
    first = 1 + len(operands)  # the step table is input 0
    aliases = {first + n: n for n in range(len(into))}
    in_specs = [*in_specs, *(pl.BlockSpec(memory_space=pl.ANY) for _ in into)]
    operands += list(into)
    kernel = _skipping_refs(kernel, len(call.operands), len(into))
  return pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=call.grid,
      in_specs=in_specs,
      out_specs=out_specs,
      scratch_shapes=scratch,
    ),
    out_shape=out_shape,
    input_output_aliases=aliases,
    compiler_params=_compiler_params(call),
    cost_estimate=call.cost,
    interpret=st.interpret,
    name=name,
  )(table, *operands)


def _skipping_refs(kernel, start: int, count: int):
  """`kernel` with the `count` refs after its first `start` inputs (aliased outputs) left out."""

  def body(table_ref, *refs):
    return kernel(table_ref, *refs[:start], *refs[start + count :])

  return body


def _grouped(st: _Static, build) -> _Call:
  """`build(heads)`, the call whose q blocks hold `heads` query heads of one GQA group, for the
  most heads that divide the group, stay within `MAX_GROUP_ROWS` rows and fit VMEM: their K/V
  tiles are fetched once for all of them. Per-head masks take one head per block (each head
  walks its own tile lists)."""
  if not st.per_head:
    for heads in range(st.groups, 1, -1):
      if st.groups % heads or heads * st.block_q > MAX_GROUP_ROWS:
        continue
      call = build(heads)
      try:
        _compiler_params(call)
      except ValueError:
        continue
      return call
  return build(1)


def _side_specs(st: _Static, row, col, tile_block, with_sinks: bool):
  """BlockSpecs of the tile rows' segment ids (a column), the tile columns' ids (a row), the
  mask tile and sinks. `row`, `col`: (tile length, block index map over the grid)."""
  (row_len, row_block), (col_len, col_block) = row, col
  specs = []
  if st.has_segments:
    specs += [
      pl.BlockSpec((pl.squeezed, row_len, 1), lambda *a: (a[0], row_block(*a), 0)),
      pl.BlockSpec((pl.squeezed, 1, col_len), lambda *a: (a[0], 0, col_block(*a))),
    ]
  specs.append(pl.BlockSpec((pl.squeezed, row_len, col_len), lambda *a: (tile_block(*a), 0, 0)))
  if with_sinks and st.has_sinks:
    specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
  return specs


def _side_args(st: _Static, row_ids, col_ids, tiles, sinks, with_sinks: bool):
  """Operands of `_side_specs`; ids `[batch, len]` become a `[batch, len, 1]` column (rows) and
  a `[batch, 1, len]` row (columns)."""
  args = [row_ids[:, :, None], col_ids[:, None, :]] if st.has_segments else []
  args.append(tiles)
  if with_sinks and st.has_sinks:
    args.append(sinks)
  return args


class _Tables(NamedTuple):
  """The kernels' mask operands: int8 tiles `[num_tiles, bq, bkv]`, the same transposed
  `[num_tiles, bkv, bq]` for the dk/dv kernel, one step table per call."""

  tiles: jax.Array
  t_tiles: jax.Array
  forward: tuple[jax.Array, ...]
  dkv: tuple[jax.Array, ...]


@dataclasses.dataclass(frozen=True)
class _Static(Static):
  """`common.Static` (shared with the GPU kernels) and the calls' step-table layouts."""

  forward_layouts: tuple[StepTable, ...] = ()
  dkv_layouts: tuple[StepTable, ...] = ()


def _tables_and_static(st: Static, info: MaskInfo, heads: int, kv_heads: int, has_sinks: bool):
  """The step tables of every call and the static settings that describe them; raises
  ValueError when a call's table and sinks would not fit SMEM."""
  forward, dkv = forward_tables(info), dkv_tables(info, heads, kv_heads)
  sinks_bytes = 4 * heads if has_sinks else 0
  for layout, _ in forward + dkv:
    if layout.smem_bytes + sinks_bytes > SMEM_BYTES:
      raise ValueError(
        f"a call's step table ({layout.smem_bytes} bytes) and sinks ({sinks_bytes} bytes) "
        f"exceed the {SMEM_BYTES}-byte SMEM"
      )
  fields = {f.name: getattr(st, f.name) for f in dataclasses.fields(st)}
  static = _Static(
    **fields,
    forward_layouts=tuple(layout for layout, _ in forward),
    dkv_layouts=tuple(layout for layout, _ in dkv),
  )
  tiles = jnp.asarray(info.tiles)
  tables = _Tables(
    tiles,
    jnp.swapaxes(tiles, 1, 2),
    tuple(jnp.asarray(t) for _, t in forward),
    tuple(jnp.asarray(t) for _, t in dkv),
  )
  return tables, static


def _cost(visits: int, matmul_dims: int, tile: tuple[int, int], per_visit_bytes: int,
          resident_bytes: int):  # fmt: skip
  """Cost of a call computing `visits` logits tiles of shape `tile`, with `matmul_dims`
  contraction widths summed over its matmuls; the bytes fetched per visit and of the blocks
  resident over a row."""
  rows, cols = tile
  return pl.CostEstimate(
    flops=int(2 * visits * rows * cols * matmul_dims),
    transcendentals=int(visits * rows * cols),
    bytes_accessed=int(visits * per_visit_bytes + resident_bytes),
  )


def _forward_call(st: _Static, tables: _Tables, q, k, v, q_seg, kv_seg, sinks):
  outs = None
  for layout, table in zip(st.forward_layouts, tables.forward, strict=True):
    outs = _forward_rows(st, layout, table, tables.tiles, q, k, v, q_seg, kv_seg, sinks, outs)
  return tuple(outs)


def _query_grid_maps(st: _Static, layout: StepTable, heads: int):
  """Index maps of the forward / dq grid `(batch, head block, row, step)` whose q blocks hold
  `heads` query heads: (q rows at `offset`, kv rows, mask tile)."""

  def entry(hh, i, j, table_ref):
    return layout.entry(table_ref, hh if st.per_head else 0, i, 0, j)

  def kv_block(bb, hh, i, j, table_ref):
    return layout.block(entry(hh, i, j, table_ref))

  def tile_block(bb, hh, i, j, table_ref):
    return layout.tile(entry(hh, i, j, table_ref))

  def q_rows(width, offset):
    return pl.BlockSpec(
      (pl.squeezed, heads, st.block_q, width), lambda bb, hh, i, j, t: (bb, hh, i + offset, 0)
    )

  def kv_rows(width):
    return pl.BlockSpec(
      (pl.squeezed, pl.squeezed, st.block_kv, width),
      lambda bb, hh, i, j, t: (
        bb,
        jax.lax.div(hh * heads, st.groups),
        kv_block(bb, hh, i, j, t),
        0,
      ),
    )

  side = functools.partial(
    _side_specs,
    st,
    (st.block_q, lambda bb, hh, i, *_: i + layout.row_start),
    (st.block_kv, kv_block),
    tile_block,
  )
  return q_rows, kv_rows, side


def _forward_rows(st: _Static, layout: StepTable, table, tiles, q, k, v, q_seg, kv_seg, sinks,
                  into):  # fmt: skip
  """Out `[b, h, padded q len, dv]` and lse `[b, h, padded q len, 1]`, written at the call's
  query rows (`into`: the previous call's, updated)."""
  b, h, rows, d = q.shape
  dv = v.shape[-1]

  def build(heads):
    q_rows, kv_rows, side_specs = _query_grid_maps(st, layout, heads)
    in_specs = [q_rows(d, layout.row_start), kv_rows(d), kv_rows(dv), *side_specs(True)]
    out_specs = [q_rows(dv, layout.row_start), q_rows(1, layout.row_start)]
    out_shape = [
      jax.ShapeDtypeStruct((b, h, rows, dv), q.dtype),
      jax.ShapeDtypeStruct((b, h, rows, 1), jnp.float32),
    ]
    tile = (heads * st.block_q, st.block_kv)
    scratch = [
      pltpu.VMEM((tile[0], LANES), jnp.float32),
      pltpu.VMEM((tile[0], LANES), jnp.float32),
      pltpu.VMEM((tile[0], dv), jnp.float32),
    ]
    visits = layout.computed * b * (1 if st.per_head else h // heads)
    itemsize = q.dtype.itemsize
    return _Call(
      grid=(b, h // heads, layout.rows, layout.steps),
      sequential=1,
      specs=(in_specs, out_specs, out_shape, scratch),
      operands=[q, k, v, *_side_args(st, q_seg, kv_seg, tiles, sinks, True)],
      logits_tile=tile,
      live_tiles=2,  # logits, probabilities
      cost=_cost(
        visits,
        d + dv,
        tile,
        st.block_kv * (d + dv) * itemsize,
        b * h * layout.rows * st.block_q * ((d + dv) * itemsize + 4),
      ),  # fmt: skip
    )

  kernel = functools.partial(_forward_kernel, st=st, layout=layout)
  return _pallas_call(kernel, st, _grouped(st, build), table, "block_sparse_fwd", into)


def _dq_call(st: _Static, tables: _Tables, q, k, v, do, lse, delta, q_seg, kv_seg):
  dq = None
  for layout, table in zip(st.forward_layouts, tables.forward, strict=True):
    dq = _dq_rows(st, layout, table, tables.tiles, q, k, v, do, lse, delta, q_seg, kv_seg, dq)
  return dq


def _dq_rows(st: _Static, layout: StepTable, table, tiles, q, k, v, do, lse, delta, q_seg, kv_seg,
             into):  # fmt: skip
  """dq `[b, h, padded q len, d]`, written at the call's query rows (`into`: the previous
  call's, updated)."""
  b, h, rows, d = q.shape
  dv = v.shape[-1]

  def build(heads):
    q_rows, kv_rows, side_specs = _query_grid_maps(st, layout, heads)
    r0 = layout.row_start
    in_specs = [
      q_rows(d, r0), kv_rows(d), kv_rows(dv), q_rows(dv, r0), q_rows(1, r0), q_rows(1, r0),
      *side_specs(False),
    ]  # fmt: skip
    tile = (heads * st.block_q, st.block_kv)
    visits = layout.computed * b * (1 if st.per_head else h // heads)
    itemsize = q.dtype.itemsize
    return _Call(
      grid=(b, h // heads, layout.rows, layout.steps),
      sequential=1,
      specs=(
        in_specs,
        [q_rows(d, r0)],
        [jax.ShapeDtypeStruct((b, h, rows, d), q.dtype)],
        [pltpu.VMEM((tile[0], d), jnp.float32)],
      ),
      operands=[q, k, v, do, lse, delta, *_side_args(st, q_seg, kv_seg, tiles, None, False)],
      logits_tile=tile,
      live_tiles=3,  # probabilities (over the logits), their gradient, ds
      cost=_cost(
        visits,
        2 * d + dv,
        tile,
        st.block_kv * (d + dv) * itemsize,
        b * h * layout.rows * st.block_q * ((3 * d + dv) * itemsize + 8),
      ),  # fmt: skip
    )

  kernel = functools.partial(_dq_kernel, st=st, layout=layout)
  previous = None if into is None else [into]
  (dq,) = _pallas_call(kernel, st, _grouped(st, build), table, "block_sparse_dq", previous)
  return dq


def _dkv_call(st: _Static, tables: _Tables, q, k, v, do, lse, delta, q_seg, kv_seg):
  grads = None
  lse_rows, delta_rows = (x.reshape(*x.shape[:2], 1, -1) for x in (lse, delta))
  for layout, table in zip(st.dkv_layouts, tables.dkv, strict=True):
    grads = _dkv_rows(
      st, layout, table, tables.t_tiles, q, k, v, do, lse_rows, delta_rows, q_seg, kv_seg, grads
    )
  return tuple(grads)


def _dkv_rows(st: _Static, layout: StepTable, table, t_tiles, q, k, v, do, lse_rows, delta_rows,
              q_seg, kv_seg, into):  # fmt: skip
  """dk `[b, hk, padded kv len, d]`, dv `[b, hk, padded kv len, dv]`, written at the call's kv
  rows (`into`: the previous call's, updated); lse and delta as rows `[b, h, 1, padded q len]`."""
  b, h, _, d = q.shape
  hk, rows = k.shape[1:3]
  dv = v.shape[-1]
  bq, bkv, r0 = st.block_q, st.block_kv, layout.row_start

  def entry(kh, kb, g, jt, table_ref):
    outer, inner = (kh, g) if st.per_head else (0, 0)
    return layout.entry(table_ref, outer, kb, inner, jt)

  def q_block(bb, kh, kb, g, jt, table_ref):
    return layout.block(entry(kh, kb, g, jt, table_ref))

  def tile_block(bb, kh, kb, g, jt, table_ref):
    return layout.tile(entry(kh, kb, g, jt, table_ref))

  def q_rows(width):
    return pl.BlockSpec(
      (pl.squeezed, pl.squeezed, bq, width),
      lambda bb, kh, kb, g, jt, t: (bb, kh * st.groups + g, q_block(bb, kh, kb, g, jt, t), 0),
    )

  q_lanes = pl.BlockSpec(
    (pl.squeezed, pl.squeezed, 1, bq),
    lambda bb, kh, kb, g, jt, t: (bb, kh * st.groups + g, 0, q_block(bb, kh, kb, g, jt, t)),
  )

  def kv_rows(width, offset=r0):
    return pl.BlockSpec(
      (pl.squeezed, pl.squeezed, bkv, width), lambda bb, kh, kb, *_: (bb, kh, kb + offset, 0)
    )

  side_specs = _side_specs(
    st, (bkv, lambda bb, kh, kb, *_: kb + r0), (bq, q_block), tile_block, with_sinks=False
  )
  in_specs = [q_rows(d), kv_rows(d), kv_rows(dv), q_rows(dv), q_lanes, q_lanes, *side_specs]
  out_specs = [kv_rows(d), kv_rows(dv)]
  out_shape = [
    jax.ShapeDtypeStruct((b, hk, rows, d), k.dtype),
    jax.ShapeDtypeStruct((b, hk, rows, dv), v.dtype),
  ]
  scratch = [pltpu.VMEM((bkv, d), jnp.float32), pltpu.VMEM((bkv, dv), jnp.float32)]
  side = _side_args(st, kv_seg, q_seg, t_tiles, None, False)
  itemsize = q.dtype.itemsize
  call = _Call(
    grid=(b, hk, layout.rows, st.groups, layout.steps),
    sequential=2,
    specs=(in_specs, out_specs, out_shape, scratch),
    operands=[q, k, v, do, lse_rows, delta_rows, *side],
    logits_tile=(bkv, bq),
    live_tiles=4,  # logits, probabilities, their gradients
    cost=_cost(
      layout.computed * b * (1 if st.per_head else h),
      2 * (d + dv),
      (bkv, bq),
      bq * ((d + dv) * itemsize + 8),
      b * hk * layout.rows * bkv * 2 * (d + dv) * itemsize,
    ),  # fmt: skip
  )
  kernel = functools.partial(_dkv_kernel, st=st, layout=layout)
  return _pallas_call(kernel, st, call, table, "block_sparse_dkv", into)


# ---------------------------------------------------------------------------------------------
# The public function.


def block_sparse_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask_info: MaskInfo,
  *,
  scale: float,
  softcap: float | None = None,
  segment_ids: tuple[jax.Array, jax.Array] | None = None,
  padding_id: int | None = None,
  sinks: jax.Array | None = None,
  interpret: bool | pltpu.InterpretParams = False,
) -> tuple[jax.Array, jax.Array]:
  """Block-sparse softmax attention; returns (out, lse).

  Args:
    q: `[batch, q_len, heads, head_dim]`; k: `[batch, kv_len, kv_heads, head_dim]`;
      v: `[batch, kv_len, kv_heads, value_dim]`; heads % kv_heads == 0 (GQA by shape).
    mask_info: tile lists built for `mask_info.block_q` x `mask_info.block_kv` tiles over the
      lengths padded up to whole blocks (padded positions must be masked out in the tiles).
    scale: logit scale. softcap: optional tanh logit cap.
    segment_ids: optional (q_ids `[batch, q_len]`, kv_ids `[batch, kv_len]`) int32.
    padding_id: segment id whose queries attend to nothing.
    sinks: optional float32 `[heads]` sink logits joining the softmax denominator.
    interpret: run the kernels in the Pallas interpreter (True, or `pltpu.InterpretParams`).

  Returns:
    out `[batch, q_len, heads, value_dim]` (q's dtype), lse float32 `[batch, q_len, heads]`
    (-inf for rows with nothing to attend to, whose output is zero).
  """
  check_call(q, k, v, mask_info)
  q_len = q.shape[1]
  bq, bkv = mask_info.block_q, mask_info.block_kv
  if interpret is False or isinstance(interpret, pltpu.InterpretParams):
    check_block_sizes(
      BlockSizes(bq, bkv), mask_info.num_q_blocks * bq, mask_info.num_kv_blocks * bkv
    )
  st = Static.of_call(
    q, k, mask_info, scale=scale, softcap=softcap, segment_ids=segment_ids,
    padding_id=padding_id, sinks=sinks, interpret=interpret,
  )  # fmt: skip
  tables, st = _tables_and_static(st, mask_info, q.shape[2], k.shape[2], sinks is not None)
  _, q, k, v, sinks, q_seg, kv_seg = kernel_operands(q, k, v, mask_info, segment_ids, sinks)
  out, lse = _attention(st, tables, q, k, v, sinks, q_seg, kv_seg)
  return out[:, :, :q_len].transpose(0, 2, 1, 3), lse[:, :, :q_len, 0].transpose(0, 2, 1)


# ---------------------------------------------------------------------------------------------
# custom_vjp wiring.


def _forward(st, tables, q, k, v, sinks, q_seg, kv_seg):
  out, lse = _forward_call(st, tables, q, k, v, q_seg, kv_seg, sinks)
  return (out, lse), (tables, q, k, v, sinks, q_seg, kv_seg, out, lse)


def _backward(st, residuals, cotangents):
  return backward(_dq_call, _dkv_call, st, residuals, cotangents)


_attention = common.custom_vjp(_forward, _backward)
