"""Block-sparse flash attention for GPUs (Pallas with the Triton backend): fwd, dq, dk/dv.

Same function and signature as `tpu.block_sparse_attention`, and equal to
`attnjax.ops.softmax.reference.attention` on the mask that the `MaskInfo` encodes.

Why Triton rather than Mosaic GPU: the kernel's inner loop has a data-dependent trip count
(each query block visits `counts[row]` kv blocks at scalar-loaded offsets), which Triton
lowers to a plain loop over pointer offsets on every NVIDIA/AMD GPU that JAX supports, while
Mosaic GPU targets Hopper+ with warpgroup-level pipelining that would need a hand-written
producer/consumer schedule around those dynamic offsets. Triton needs power-of-two tiles, so
head dims are zero-padded up to a power of two (zeros change neither logits nor outputs).

One program per (batch, head, query block) walks its kv list; the dq kernel does the same,
and the dk/dv kernel walks, per kv block, the transposed list for each query head of its
GQA group (K/V are never repeated). Probabilities are recomputed from the saved lse.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import common, triton
from kernels_pallas.block_sparse.common import (
  FULL,
  BlockSizes,
  MaskInfo,
  Static,
  backward,
  check_call,
  kernel_operands,
)
from kernels_pallas.triton import MIN_DOT, triton_call, whole


def check_block_sizes(block_sizes: BlockSizes, *, interpret: bool) -> None:
  """Raises ValueError unless both blocks are powers of two, at least `MIN_DOT` on hardware."""
  smallest = 1 if interpret else MIN_DOT
  for name in ("block_q", "block_kv"):
    value = getattr(block_sizes, name)
    if not common.is_power_of_two(value) or value < smallest:
      raise ValueError(f"{name}={value} must be a power of two >= {smallest} for the Triton kernel")


@dataclasses.dataclass(frozen=True)
class _Static(Static):
  """`common.Static` (shared with the TPU kernels) plus the Triton launch settings."""

  num_warps: int = 4
  num_stages: int = 2


# ---------------------------------------------------------------------------------------------
# Kernel bodies.


def _logits(st, q, k):
  s = common.dot(q, k, dtype=k.dtype, transpose_b=True) * st.scale
  if st.softcap is None:
    return s, None
  capped = jnp.tanh(s / st.softcap)
  return st.softcap * capped, capped


def _allowed(st, kind, tile, q_ids, kv_ids):
  allowed = (kind == FULL) | (tile != 0)
  if st.has_segments:
    same = q_ids[:, None] == kv_ids[None, :]
    if st.padding_id is not None:
      same = same & (q_ids != st.padding_id)[:, None]
    allowed = allowed & same
  return allowed


def _tile_inputs(st, refs, row_head, row, j):
  """(kind, listed block id, mask tile) for step `j` of `row` from the scalar tables."""
  indices_ref, kinds_ref, pids_ref, tiles_ref = refs
  mask_head = row_head if st.per_head else 0
  kind = kinds_ref[mask_head, row, j]
  tile = tiles_ref[pids_ref[mask_head, row, j]]
  return kind, indices_ref[mask_head, row, j], tile


def _forward_kernel(
  counts_ref, indices_ref, kinds_ref, pids_ref, tiles_ref, q_ref, k_ref, v_ref, *refs, st
):
  q_seg_ref, kv_seg_ref, sinks_ref, o_ref, lse_ref = _unpack(st, refs, with_sinks=True)
  h, i = pl.program_id(1), pl.program_id(2)
  q = q_ref[...]
  q_ids = q_seg_ref[...] if st.has_segments else None
  bq, dv = q.shape[0], v_ref.shape[-1]

  def body(j, carry):
    acc, row_max, row_sum = carry
    kind, kb, tile = _tile_inputs(st, (indices_ref, kinds_ref, pids_ref, tiles_ref), h, i, j)
    kv_slice = pl.ds(kb * st.block_kv, st.block_kv)
    s, _ = _logits(st, q, k_ref[kv_slice, :])
    kv_ids = kv_seg_ref[kv_slice] if st.has_segments else None
    s = jnp.where(_allowed(st, kind, tile, q_ids, kv_ids), s, -jnp.inf)
    new_max = jnp.maximum(row_max, s.max(axis=1))
    shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
    p = jnp.exp(s - shift[:, None])
    correction = jnp.exp(row_max - shift)
    v = v_ref[kv_slice, :]
    pv = common.dot(p, v, dtype=v.dtype)
    return acc * correction[:, None] + pv, new_max, row_sum * correction + p.sum(axis=1)

  init = (
    jnp.zeros((bq, dv), jnp.float32),
    jnp.full((bq,), -jnp.inf, jnp.float32),
    jnp.zeros((bq,), jnp.float32),
  )
  count = counts_ref[h if st.per_head else 0, i]
  acc, row_max, row_sum = jax.lax.fori_loop(0, count, body, init)
  shift = jnp.where(row_max == -jnp.inf, 0.0, row_max)
  if st.has_sinks:
    row_sum = row_sum + jnp.exp(sinks_ref[h] - shift)
  live = row_sum > 0
  safe_sum = jnp.where(live, row_sum, 1.0)
  o_ref[...] = (acc / safe_sum[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(live, jnp.log(safe_sum) + shift, -jnp.inf)


def _unpack(st, refs, with_sinks):
  refs = list(refs)
  q_seg = kv_seg = sinks = None
  if st.has_segments:
    q_seg, kv_seg = refs.pop(0), refs.pop(0)
  if with_sinks and st.has_sinks:
    sinks = refs.pop(0)
  return (q_seg, kv_seg, sinks, *refs)


def _probs_and_dlogits(st, kind, tile, q, k, v, do, lse, delta, q_ids, kv_ids):
  s, capped = _logits(st, q, k)
  allowed = _allowed(st, kind, tile, q_ids, kv_ids)
  p = jnp.where(allowed, jnp.exp(s - jnp.where(lse == -jnp.inf, 0.0, lse)[:, None]), 0.0)
  dp = common.dot(do, v, dtype=v.dtype, transpose_b=True)
  ds = p * (dp - delta[:, None])
  if capped is not None:
    ds = ds * (1.0 - capped * capped)
  return p, ds * st.scale


def _dq_kernel(
  counts_ref,
  indices_ref,
  kinds_ref,
  pids_ref,
  tiles_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  *refs,
  st,
):
  q_seg_ref, kv_seg_ref, _, dq_ref = _unpack(st, refs, with_sinks=False)
  h, i = pl.program_id(1), pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_ids = q_seg_ref[...] if st.has_segments else None

  def body(j, dq):
    kind, kb, tile = _tile_inputs(st, (indices_ref, kinds_ref, pids_ref, tiles_ref), h, i, j)
    kv_slice = pl.ds(kb * st.block_kv, st.block_kv)
    k = k_ref[kv_slice, :]
    kv_ids = kv_seg_ref[kv_slice] if st.has_segments else None
    _, ds = _probs_and_dlogits(
      st, kind, tile, q, k, v_ref[kv_slice, :], do, lse, delta, q_ids, kv_ids
    )
    return dq + common.dot(ds, k, dtype=k.dtype)

  count = counts_ref[h if st.per_head else 0, i]
  dq = jax.lax.fori_loop(0, count, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(
  counts_ref,
  indices_ref,
  kinds_ref,
  pids_ref,
  tiles_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  *refs,
  st,
):
  q_seg_ref, kv_seg_ref, _, dk_ref, dv_ref = _unpack(st, refs, with_sinks=False)
  kv_head, kb = pl.program_id(1), pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  kv_ids = kv_seg_ref[...] if st.has_segments else None

  def per_group(g, carry):
    h = kv_head * st.groups + g

    def body(j, carry):
      dk, dv = carry
      kind, qb, tile = _tile_inputs(st, (indices_ref, kinds_ref, pids_ref, tiles_ref), h, kb, j)
      q_slice = pl.ds(qb * st.block_q, st.block_q)
      q = q_ref[g, q_slice, :]
      do = do_ref[g, q_slice, :]
      q_ids = q_seg_ref[q_slice] if st.has_segments else None
      p, ds = _probs_and_dlogits(
        st, kind, tile, q, k, v, do, lse_ref[g, q_slice], delta_ref[g, q_slice], q_ids, kv_ids
      )
      dv = dv + common.dot(p, do, dtype=do.dtype, transpose_a=True)
      dk = dk + common.dot(ds, q, dtype=q.dtype, transpose_a=True)
      return dk, dv

    count = counts_ref[h if st.per_head else 0, kb]
    return jax.lax.fori_loop(0, count, body, carry)

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = jax.lax.fori_loop(0, st.groups, per_group, init)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------
# pallas_call wiring.


def _tables(info: MaskInfo, transposed: bool):
  if transposed:
    tables = (info.t_counts, info.t_indices, info.t_kinds, info.t_partial_ids)
  else:
    tables = (info.counts, info.indices, info.kinds, info.partial_ids)
  return (*tables, info.tiles)


def _segment_specs(st, q_index, kv_index, q_len, kv_len, q_block=True, kv_block=False):
  if not st.has_segments:
    return []
  q_shape = (pl.squeezed, st.block_q if q_block else q_len)
  kv_shape = (pl.squeezed, st.block_kv if kv_block else kv_len)
  return [pl.BlockSpec(q_shape, q_index), pl.BlockSpec(kv_shape, kv_index)]


def _forward_call(st, info, q, k, v, q_seg, kv_seg, sinks):
  b, h, tq, d = q.shape
  tk, dv = k.shape[2], v.shape[-1]
  tables = _tables(info, transposed=False)
  in_specs = [
    *(whole(t.shape) for t in tables),
    pl.BlockSpec((pl.squeezed, pl.squeezed, st.block_q, d), lambda bb, hh, i: (bb, hh, i, 0)),
    pl.BlockSpec(
      (pl.squeezed, pl.squeezed, tk, d), lambda bb, hh, i: (bb, jax.lax.div(hh, st.groups), 0, 0)
    ),
    pl.BlockSpec(
      (pl.squeezed, pl.squeezed, tk, dv), lambda bb, hh, i: (bb, jax.lax.div(hh, st.groups), 0, 0)
    ),
    *_segment_specs(st, lambda bb, hh, i: (bb, i), lambda bb, hh, i: (bb, 0), tq, tk),
  ]
  args = [*tables, q, k, v, *([q_seg, kv_seg] if st.has_segments else [])]
  if st.has_sinks:
    in_specs.append(whole(sinks.shape))
    args.append(sinks)
  out_specs = [
    pl.BlockSpec((pl.squeezed, pl.squeezed, st.block_q, dv), lambda bb, hh, i: (bb, hh, i, 0)),
    pl.BlockSpec((pl.squeezed, pl.squeezed, st.block_q), lambda bb, hh, i: (bb, hh, i)),
  ]
  out_shape = [
    jax.ShapeDtypeStruct((b, h, tq, dv), q.dtype),
    jax.ShapeDtypeStruct((b, h, tq), jnp.float32),
  ]
  grid = (b, h, tq // st.block_q)
  return triton_call(
    st, _forward_kernel, grid, in_specs, out_specs, out_shape, "block_sparse_fwd_gpu"
  )(*args)


def _dq_call(st, info, q, k, v, do, lse, delta, q_seg, kv_seg):
  b, h, tq, d = q.shape
  tk, dv = k.shape[2], v.shape[-1]
  tables = _tables(info, transposed=False)

  def rows(width):
    block = (pl.squeezed, pl.squeezed, st.block_q) + ((width,) if width else ())
    return pl.BlockSpec(block, lambda bb, hh, i: (bb, hh, i) + ((0,) if width else ()))

  def whole_kv(width):
    return pl.BlockSpec(
      (pl.squeezed, pl.squeezed, tk, width),
      lambda bb, hh, i: (bb, jax.lax.div(hh, st.groups), 0, 0),
    )

  in_specs = [
    *(whole(t.shape) for t in tables),
    rows(d),
    whole_kv(d),
    whole_kv(dv),
    rows(dv),
    rows(None),
    rows(None),
    *_segment_specs(st, lambda bb, hh, i: (bb, i), lambda bb, hh, i: (bb, 0), tq, tk),
  ]
  args = [*tables, q, k, v, do, lse, delta, *([q_seg, kv_seg] if st.has_segments else [])]
  return triton_call(
    st,
    _dq_kernel,
    (b, h, tq // st.block_q),
    in_specs,
    rows(d),
    jax.ShapeDtypeStruct(q.shape, q.dtype),
    "block_sparse_dq_gpu",
  )(*args)


def _dkv_call(st, info, q, k, v, do, lse, delta, q_seg, kv_seg):
  b, h, tq, d = q.shape
  hk, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
  g = st.groups
  tables = _tables(info, transposed=True)

  def group_rows(width):
    block = (pl.squeezed, g, tq) + ((width,) if width else ())
    return pl.BlockSpec(block, lambda bb, kh, kb: (bb, kh, 0) + ((0,) if width else ()))

  def kv_rows(width):
    return pl.BlockSpec(
      (pl.squeezed, pl.squeezed, st.block_kv, width), lambda bb, kh, kb: (bb, kh, kb, 0)
    )

  in_specs = [
    *(whole(t.shape) for t in tables),
    group_rows(d),
    kv_rows(d),
    kv_rows(dv),
    group_rows(dv),
    group_rows(None),
    group_rows(None),
    *_segment_specs(
      st,
      lambda bb, kh, kb: (bb, 0),
      lambda bb, kh, kb: (bb, kb),
      tq,
      tk,
      q_block=False,
      kv_block=True,
    ),
  ]
  args = [*tables, q, k, v, do, lse, delta, *([q_seg, kv_seg] if st.has_segments else [])]
  return triton_call(
    st,
    _dkv_kernel,
    (b, hk, tk // st.block_kv),
    in_specs,
    [kv_rows(d), kv_rows(dv)],
    [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    "block_sparse_dkv_gpu",
  )(*args)


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
  interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Same contract as `kernels_pallas.block_sparse.tpu.block_sparse_attention`."""
  check_call(q, k, v, mask_info)
  triton.check_head_dims(interpret=interpret, head_dim=q.shape[3], value_dim=v.shape[3])
  check_block_sizes(BlockSizes(mask_info.block_q, mask_info.block_kv), interpret=interpret)
  st = _Static.of_call(
    q, k, mask_info, scale=scale, softcap=softcap, segment_ids=segment_ids,
    padding_id=padding_id, sinks=sinks, interpret=bool(interpret),
  )  # fmt: skip
  q_len, value_dim = q.shape[1], v.shape[3]
  # Triton tiles are powers of two: zero head-dim columns change neither logits nor outputs.
  head_dims = (common.next_power_of_two(q.shape[3]), common.next_power_of_two(value_dim))
  operands = kernel_operands(q, k, v, mask_info, segment_ids, sinks, head_dims)
  out, lse = _attention(st, *operands)
  return out[:, :, :q_len, :value_dim].transpose(0, 2, 1, 3), lse[:, :, :q_len].transpose(0, 2, 1)


# ---------------------------------------------------------------------------------------------
# custom_vjp wiring.


def _forward(st, info, q, k, v, sinks, q_seg, kv_seg):
  out, lse = _forward_call(st, info, q, k, v, q_seg, kv_seg, sinks)
  return (out, lse), (info, q, k, v, sinks, q_seg, kv_seg, out, lse)


def _backward(st, residuals, cotangents):
  return backward(_dq_call, _dkv_call, st, residuals, cotangents)


_attention = common.custom_vjp(_forward, _backward)
