"""Block-sparse flash attention for TPU (Pallas Mosaic): forward, dq and dk/dv kernels.

Equals `attnjax.ops.softmax.reference.attention` (the float32 oracle) on the mask that the
`MaskInfo` encodes. Per query block, the forward grid walks only the kv blocks listed for it
(scalar-prefetched into SMEM, so the pipeline fetches exactly those K/V tiles); FULL tiles run
without any mask arithmetic, PARTIAL tiles apply their deduplicated int8 tile, EMPTY tiles are
never fetched or computed (grid steps past a row's count do nothing and, since the padded ids
repeat the last one, copy nothing). The online softmax (FlashAttention-2, Dao 2023) keeps its
running max / sum in VMEM scratch replicated over the 128 lanes.

Backward recomputes probabilities from the saved log-sum-exp: the dq kernel walks the forward
lists; the dk/dv kernel walks the transposed lists (per kv block, the query blocks that see
it) and loops over the query heads of a GQA group in the grid, so K/V are never repeated.

Layout inside: `[batch, heads, seq, dim]` (the wrapper transposes), lse / delta as
`[batch, heads, seq, 1]` columns, query segment ids `[batch, seq, 1]`, kv ids `[batch, 1, seq]`.
Mosaic kernels are not auto-partitioned: inside `shard_map` they run on each shard.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import common
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


def check_block_sizes(block_sizes: BlockSizes, q_len_padded: int, kv_len_padded: int) -> None:
  """Raises ValueError unless the tiles satisfy Mosaic's (8, 128) block-shape rule.

  `block_q % 32 == 0` (8 for float32 rows, 32 for the int8 mask tiles) and
  `block_kv % 128 == 0`, or one block spans the whole padded length.
  """
  if block_sizes.block_q % 32 and block_sizes.block_q != q_len_padded:
    raise ValueError(
      f"block_q={block_sizes.block_q} must be a multiple of 32 on TPU (8 for f32 rows, 32 for "
      f"the int8 mask tiles) or equal the padded q length {q_len_padded}"
    )
  if block_sizes.block_kv % 128 and block_sizes.block_kv != kv_len_padded:
    raise ValueError(
      f"block_kv={block_sizes.block_kv} must be a multiple of 128 on TPU or equal the padded kv "
      f"length {kv_len_padded}"
    )


# The static settings of a call: `common.Static` (shared with the GPU kernels).
_Static = Static


# ---------------------------------------------------------------------------------------------
# Kernel bodies.


def _logits(st: _Static, q, k):
  """Scaled (and capped) logits `[bq, bkv]` in float32, and the cap's tanh for the backward."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  s = s * st.scale
  if st.softcap is None:
    return s, None
  capped = jnp.tanh(s / st.softcap)
  return st.softcap * capped, capped


def _allowed(st: _Static, apply_tile: bool, tile_ref, q_seg_ref, kv_seg_ref):
  """Boolean `[bq, bkv]` of allowed pairs, or None when everything is allowed."""
  allowed = tile_ref[...] != 0 if apply_tile else None
  if st.has_segments:
    q_ids, kv_ids = q_seg_ref[...], kv_seg_ref[...]  # [bq, 1], [1, bkv]
    same = q_ids == kv_ids
    if st.padding_id is not None:
      same = same & (q_ids != st.padding_id)
    allowed = same if allowed is None else allowed & same
  return allowed


def _split_refs(st: _Static, refs, n_main: int, with_sinks: bool):
  """Splits the kernel refs: main inputs, segment ids, mask tile, sinks, then the rest."""
  main, rest = list(refs[:n_main]), list(refs[n_main:])
  q_seg = kv_seg = sinks = None
  if st.has_segments:
    q_seg, kv_seg = rest.pop(0), rest.pop(0)
  tile = rest.pop(0)
  if with_sinks and st.has_sinks:
    sinks = rest.pop(0)
  return main, q_seg, kv_seg, tile, sinks, rest


def _forward_kernel(counts_ref, indices_ref, kinds_ref, pids_ref, *refs, st: _Static):
  del counts_ref, indices_ref, pids_ref
  (q_ref, k_ref, v_ref), q_seg, kv_seg, tile_ref, sinks_ref, rest = _split_refs(
    st, refs, 3, with_sinks=True
  )
  o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
  h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  kind = kinds_ref[h if st.per_head else 0, i, j]

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def update(apply_tile: bool):
    s, _ = _logits(st, q_ref[...], k_ref[...])
    allowed = _allowed(st, apply_tile, tile_ref, q_seg, kv_seg)
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
    pv = jax.lax.dot_general(
      p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    acc_scr[...] = acc_scr[...] * correction[:, :1] + pv

  pl.when(kind == FULL)(lambda: update(apply_tile=False))
  pl.when(kind == PARTIAL)(lambda: update(apply_tile=True))

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    m, total = m_scr[...][:, :1], l_scr[...][:, :1]
    shift = jnp.where(m == -jnp.inf, 0.0, m)
    if st.has_sinks:
      total = total + jnp.exp(sinks_ref[h] - shift)
    live = total > 0
    safe_total = jnp.where(live, total, 1.0)
    o_ref[...] = (acc_scr[...] / safe_total).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(live, jnp.log(safe_total) + shift, -jnp.inf)


def _probs_and_dlogits(st: _Static, apply_tile, q, k, v, do, lse, delta, tile, q_seg, kv_seg):
  """Recomputed probabilities `[bq, bkv]` and d loss / d (q k^T) (scale applied)."""
  s, capped = _logits(st, q, k)
  p = jnp.exp(s - jnp.where(lse == -jnp.inf, 0.0, lse))
  allowed = _allowed(st, apply_tile, tile, q_seg, kv_seg)
  if allowed is not None:
    p = jnp.where(allowed, p, 0.0)
  dp = jax.lax.dot_general(
    do, v.astype(jnp.float32), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
  )
  ds = p * (dp - delta)
  if capped is not None:
    ds = ds * (1.0 - capped * capped)
  return p, ds * st.scale


def _dq_kernel(counts_ref, indices_ref, kinds_ref, pids_ref, *refs, st: _Static):
  del counts_ref, indices_ref, pids_ref
  main, q_seg, kv_seg, tile_ref, _, rest = _split_refs(st, refs, 6, with_sinks=False)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = main
  dq_ref, dq_scr = rest
  h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  kind = kinds_ref[h if st.per_head else 0, i, j]

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  def update(apply_tile: bool):
    k = k_ref[...]
    _, ds = _probs_and_dlogits(
      st,
      apply_tile,
      q_ref[...],
      k,
      v_ref[...],
      do_ref[...].astype(jnp.float32),
      lse_ref[...],
      delta_ref[...],
      tile_ref,
      q_seg,
      kv_seg,
    )
    dq_scr[...] += jax.lax.dot_general(
      ds, k.astype(jnp.float32), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )

  pl.when(kind == FULL)(lambda: update(apply_tile=False))
  pl.when(kind == PARTIAL)(lambda: update(apply_tile=True))

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(counts_ref, indices_ref, kinds_ref, pids_ref, *refs, st: _Static):
  del counts_ref, indices_ref, pids_ref
  main, q_seg, kv_seg, tile_ref, _, rest = _split_refs(st, refs, 6, with_sinks=False)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = main
  dk_ref, dv_ref, dk_scr, dv_scr = rest
  kv_head, kb, g, jt = pl.program_id(1), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  h = kv_head * st.groups + g
  kind = kinds_ref[h if st.per_head else 0, kb, jt]

  @pl.when((g == 0) & (jt == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def update(apply_tile: bool):
    q, do = q_ref[...].astype(jnp.float32), do_ref[...].astype(jnp.float32)
    p, ds = _probs_and_dlogits(
      st,
      apply_tile,
      q_ref[...],
      k_ref[...],
      v_ref[...],
      do,
      lse_ref[...],
      delta_ref[...],
      tile_ref,
      q_seg,
      kv_seg,
    )
    transposed_lhs = (((0,), (0,)), ((), ()))
    dv_scr[...] += jax.lax.dot_general(p, do, transposed_lhs, preferred_element_type=jnp.float32)
    dk_scr[...] += jax.lax.dot_general(ds, q, transposed_lhs, preferred_element_type=jnp.float32)

  pl.when(kind == FULL)(lambda: update(apply_tile=False))
  pl.when(kind == PARTIAL)(lambda: update(apply_tile=True))

  @pl.when((g == pl.num_programs(3) - 1) & (jt == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------
# pallas_call wiring.


def _compiler_params(*semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _prefetch(info: MaskInfo, transposed: bool):
  if transposed:
    return (info.t_counts, info.t_indices, info.t_kinds, info.t_partial_ids)
  return (info.counts, info.indices, info.kinds, info.partial_ids)


def _side_specs(st: _Static, q_block, kv_block, tile_block, with_sinks: bool):
  """BlockSpecs of segment ids, mask tile and sinks, given index maps over the grid."""
  specs = []
  if st.has_segments:
    specs += [
      pl.BlockSpec((pl.squeezed, st.block_q, 1), lambda *a: (a[0], q_block(*a), 0)),
      pl.BlockSpec((pl.squeezed, 1, st.block_kv), lambda *a: (a[0], 0, kv_block(*a))),
    ]
  specs.append(
    pl.BlockSpec((pl.squeezed, st.block_q, st.block_kv), lambda *a: (tile_block(*a), 0, 0))
  )
  if with_sinks and st.has_sinks:
    specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
  return specs


def _side_args(st: _Static, q_seg, kv_seg, tiles, sinks, with_sinks: bool):
  args = [q_seg, kv_seg] if st.has_segments else []
  args.append(tiles)
  if with_sinks and st.has_sinks:
    args.append(sinks)
  return args


def _forward_call(st: _Static, info: MaskInfo, q, k, v, q_seg, kv_seg, sinks):
  b, h, tq, d = q.shape
  dv = v.shape[-1]
  bq, bkv = st.block_q, st.block_kv
  mh = (lambda hh: hh) if st.per_head else (lambda hh: 0)
  grid = (b, h, tq // bq, info.indices.shape[-1])

  def kv_block(bb, hh, i, j, counts, indices, kinds, pids):
    return indices[mh(hh), i, j]

  def q_block(bb, hh, i, j, *_):
    return i

  def tile_block(bb, hh, i, j, counts, indices, kinds, pids):
    return pids[mh(hh), i, j]

  in_specs = [
    pl.BlockSpec((pl.squeezed, pl.squeezed, bq, d), lambda bb, hh, i, j, *_: (bb, hh, i, 0)),
    pl.BlockSpec(
      (pl.squeezed, pl.squeezed, bkv, d),
      lambda bb, hh, i, j, *p: (bb, jax.lax.div(hh, st.groups), kv_block(bb, hh, i, j, *p), 0),
    ),
    pl.BlockSpec(
      (pl.squeezed, pl.squeezed, bkv, dv),
      lambda bb, hh, i, j, *p: (bb, jax.lax.div(hh, st.groups), kv_block(bb, hh, i, j, *p), 0),
    ),
    *_side_specs(st, q_block, kv_block, tile_block, with_sinks=True),
  ]
  out_specs = [
    pl.BlockSpec((pl.squeezed, pl.squeezed, bq, dv), lambda bb, hh, i, j, *_: (bb, hh, i, 0)),
    pl.BlockSpec((pl.squeezed, pl.squeezed, bq, 1), lambda bb, hh, i, j, *_: (bb, hh, i, 0)),
  ]
  visited = None
  if _is_concrete(info.counts):
    visited = int(np.asarray(info.counts).sum()) * b * (1 if st.per_head else h)
  return pl.pallas_call(
    functools.partial(_forward_kernel, st=st),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      scratch_shapes=[
        pltpu.VMEM((bq, LANES), jnp.float32),
        pltpu.VMEM((bq, LANES), jnp.float32),
        pltpu.VMEM((bq, dv), jnp.float32),
      ],
    ),
    out_shape=[
      jax.ShapeDtypeStruct((b, h, tq, dv), q.dtype),
      jax.ShapeDtypeStruct((b, h, tq, 1), jnp.float32),
    ],
    compiler_params=_compiler_params("parallel", "parallel", "parallel", "arbitrary"),
    cost_estimate=_cost(visited, b, h, bq, bkv, d, dv, q, passes=1),
    interpret=st.interpret,
    name="block_sparse_fwd",
  )(*_prefetch(info, False), q, k, v, *_side_args(st, q_seg, kv_seg, info.tiles, sinks, True))


def _dq_call(st: _Static, info: MaskInfo, q, k, v, do, lse, delta, q_seg, kv_seg):
  b, h, tq, d = q.shape
  dv = v.shape[-1]
  bq, bkv = st.block_q, st.block_kv
  mh = (lambda hh: hh) if st.per_head else (lambda hh: 0)
  grid = (b, h, tq // bq, info.indices.shape[-1])

  def kv_block(bb, hh, i, j, counts, indices, kinds, pids):
    return indices[mh(hh), i, j]

  def tile_block(bb, hh, i, j, counts, indices, kinds, pids):
    return pids[mh(hh), i, j]

  def q_rows(width):
    return pl.BlockSpec(
      (pl.squeezed, pl.squeezed, bq, width), lambda bb, hh, i, j, *_: (bb, hh, i, 0)
    )

  def kv_rows(width):
    return pl.BlockSpec(
      (pl.squeezed, pl.squeezed, bkv, width),
      lambda bb, hh, i, j, *p: (bb, jax.lax.div(hh, st.groups), kv_block(bb, hh, i, j, *p), 0),
    )

  in_specs = [
    q_rows(d),
    kv_rows(d),
    kv_rows(dv),
    q_rows(dv),
    q_rows(1),
    q_rows(1),
    *_side_specs(st, lambda bb, hh, i, j, *_: i, kv_block, tile_block, with_sinks=False),
  ]
  return pl.pallas_call(
    functools.partial(_dq_kernel, st=st),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=grid,
      in_specs=in_specs,
      out_specs=q_rows(d),
      scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
    ),
    out_shape=jax.ShapeDtypeStruct((b, h, tq, d), q.dtype),
    compiler_params=_compiler_params("parallel", "parallel", "parallel", "arbitrary"),
    interpret=st.interpret,
    name="block_sparse_dq",
  )(
    *_prefetch(info, False),
    q,
    k,
    v,
    do,
    lse,
    delta,
    *_side_args(st, q_seg, kv_seg, info.tiles, None, False),
  )


def _dkv_call(st: _Static, info: MaskInfo, q, k, v, do, lse, delta, q_seg, kv_seg):
  b, h, _, d = q.shape
  hk, tk, _ = k.shape[1:]
  dv = v.shape[-1]
  bq, bkv = st.block_q, st.block_kv
  mh = (lambda hh: hh) if st.per_head else (lambda hh: 0)
  grid = (b, hk, tk // bkv, st.groups, info.t_indices.shape[-1])

  def q_block(bb, kh, kb, g, jt, counts, indices, kinds, pids):
    return indices[mh(kh * st.groups + g), kb, jt]

  def tile_block(bb, kh, kb, g, jt, counts, indices, kinds, pids):
    return pids[mh(kh * st.groups + g), kb, jt]

  def q_rows(width):
    return pl.BlockSpec(
      (pl.squeezed, pl.squeezed, bq, width),
      lambda bb, kh, kb, g, jt, *p: (bb, kh * st.groups + g, q_block(bb, kh, kb, g, jt, *p), 0),
    )

  def kv_rows(width):
    return pl.BlockSpec(
      (pl.squeezed, pl.squeezed, bkv, width), lambda bb, kh, kb, g, jt, *_: (bb, kh, kb, 0)
    )

  in_specs = [
    q_rows(d),
    kv_rows(d),
    kv_rows(dv),
    q_rows(dv),
    q_rows(1),
    q_rows(1),
    *_side_specs(st, q_block, lambda bb, kh, kb, *_: kb, tile_block, with_sinks=False),
  ]
  return pl.pallas_call(
    functools.partial(_dkv_kernel, st=st),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=grid,
      in_specs=in_specs,
      out_specs=[kv_rows(d), kv_rows(dv)],
      scratch_shapes=[pltpu.VMEM((bkv, d), jnp.float32), pltpu.VMEM((bkv, dv), jnp.float32)],
    ),
    out_shape=[
      jax.ShapeDtypeStruct(k.shape, k.dtype),
      jax.ShapeDtypeStruct(v.shape, v.dtype),
    ],
    compiler_params=_compiler_params("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
    interpret=st.interpret,
    name="block_sparse_dkv",
  )(
    *_prefetch(info, True),
    q,
    k,
    v,
    do,
    lse,
    delta,
    *_side_args(st, q_seg, kv_seg, info.tiles, None, False),
  )


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _cost(tiles, b, h, bq, bkv, d, dv, q, passes):
  """Cost of the visited tiles only: empty tiles are neither fetched nor computed."""
  if tiles is None:
    return None
  return pl.CostEstimate(
    flops=int(2 * tiles * bq * bkv * (d + dv) * passes),
    transcendentals=int(tiles * bq * bkv * passes),
    bytes_accessed=int(tiles * bkv * (d + dv) * q.dtype.itemsize + 2 * b * h * bq * d),
  )


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
  st = _Static.of_call(
    q, k, mask_info, scale=scale, softcap=softcap, segment_ids=segment_ids,
    padding_id=padding_id, sinks=sinks, interpret=interpret,
  )  # fmt: skip
  info, q, k, v, sinks, q_seg, kv_seg = kernel_operands(q, k, v, mask_info, segment_ids, sinks)
  if st.has_segments:  # query ids as a column, kv ids as a row
    q_seg, kv_seg = q_seg[:, :, None], kv_seg[:, None, :]
  out, lse = _attention(st, info, q, k, v, sinks, q_seg, kv_seg)
  return out[:, :, :q_len].transpose(0, 2, 1, 3), lse[:, :, :q_len, 0].transpose(0, 2, 1)


# ---------------------------------------------------------------------------------------------
# custom_vjp wiring.


def _forward(st, info, q, k, v, sinks, q_seg, kv_seg):
  out, lse = _forward_call(st, info, q, k, v, q_seg, kv_seg, sinks)
  return (out, lse), (info, q, k, v, sinks, q_seg, kv_seg, out, lse)


def _backward(st, residuals, cotangents):
  return backward(_dq_call, _dkv_call, st, residuals, cotangents)


_attention = common.custom_vjp(_forward, _backward)
