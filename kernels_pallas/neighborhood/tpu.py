"""Tile-sparse flash attention for TPU (Mosaic): the kernel of local / neighborhood attention.

The sequence is laid out tile-major (`T` consecutive rows form one multi-dimensional spatial
tile) and a static `TileSchedule` lists, for every query tile, the key tiles it reaches and a
boolean tile per (query tile, key tile) pair, deduplicated in `mask_table`. The forward kernel
walks that list with an online softmax (grid `[batch, heads, query tiles, steps]`, the key tile
of each step chosen by scalar-prefetched indices); the backward pass is two kernels, one over
the same list for dq and one over the transposed list for dk and dv (GQA heads summed in the
grid). Joined by `jax.custom_vjp`; `interpret=True` (or `pltpu.InterpretParams()`) runs it on
CPU. Tile sizes are the schedule's: `T` rows per tile, a multiple of 8 (sublanes) on hardware.

The schedule is computed by `attnjax.ops.neighborhood.window.tile_plan`, and the kernel must
equal `attnjax.ops.neighborhood.reference.attention` on the same windows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import common
from kernels_pallas.neighborhood.common import NN, NT, TN, TileSchedule, check_call


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call (hashable: the `custom_vjp`'s non-differentiable argument)."""

  schedule: TileSchedule  # hashed by identity
  scale: float
  interpret: bool | pltpu.InterpretParams


# ---------------------------------------------------------------------------------------------
# Kernel bodies.


def _allowed(mask):
  """int8 mask tile `[Tq, Tk]` -> bool. Widened to int32 first: v4's Mosaic cannot compare
  8-bit vectors; the int32 copy of a 128 x 128 tile is 64 KiB of VMEM, under 0.5% of any
  generation's."""
  return mask.astype(jnp.int32) != 0


def _probs(st: _Static, q, k, mask, lse):
  """Recomputed probabilities `[Tq, Tk]` of one tile pair from the saved log-sum-exp."""
  logits = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * st.scale
  allowed = _allowed(mask)
  safe_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  return jnp.where(allowed, jnp.exp(jnp.where(allowed, logits, 0.0) - safe_lse), 0.0)


def _forward_kernel(
  kv_ref, counts_ref, ids_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc,
  *, st,
):  # fmt: skip
  del kv_ref, ids_ref  # used by the index maps
  i, s = pl.program_id(2), pl.program_id(3)

  @pl.when(s == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(s < counts_ref[i])
  def _step():
    allowed = _allowed(mask_ref[...])
    logits = lax.dot_general(q_ref[...], k_ref[...], NT, preferred_element_type=jnp.float32)
    logits = jnp.where(allowed, logits * st.scale, -jnp.inf)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, logits.max(-1, keepdims=True))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    probs = jnp.where(allowed, jnp.exp(logits - shift), 0.0)
    alpha = jnp.exp(m_prev - shift)
    l_sc[...] = alpha * l_sc[...] + probs.sum(-1, keepdims=True)
    pv = lax.dot_general(
      probs.astype(v_ref.dtype), v_ref[...], NN, preferred_element_type=jnp.float32
    )
    acc_sc[...] = alpha * acc_sc[...] + pv
    m_sc[...] = m_new

  @pl.when(s == pl.num_programs(3) - 1)
  def _finish():
    denom = l_sc[...]
    safe_denom = jnp.where(denom > 0, denom, 1.0)
    o_ref[...] = (acc_sc[...] / safe_denom).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(denom > 0, m_sc[...] + jnp.log(safe_denom), -jnp.inf)


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
    probs = _probs(st, q_ref[...], k_ref[...], mask_ref[...], lse_ref[...])
    d_probs = lax.dot_general(do_ref[...], v_ref[...], NT, preferred_element_type=jnp.float32)
    d_logits = probs * (d_probs - delta_ref[...])
    dq_sc[...] += st.scale * lax.dot_general(
      d_logits.astype(k_ref.dtype), k_ref[...], NN, preferred_element_type=jnp.float32
    )

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
    # Query-major [Tq, Tk] tiles, so lse and delta stay columns; the key side contracts dim 0.
    probs = _probs(st, q_ref[...], k_ref[...], mask_ref[...], lse_ref[...])
    d_out = do_ref[...]
    dv_sc[...] += lax.dot_general(
      probs.astype(d_out.dtype), d_out, TN, preferred_element_type=jnp.float32
    )
    d_probs = lax.dot_general(d_out, v_ref[...], NT, preferred_element_type=jnp.float32)
    d_logits = probs * (d_probs - delta_ref[...])
    dk_sc[...] += st.scale * lax.dot_general(
      d_logits.astype(q_ref.dtype), q_ref[...], TN, preferred_element_type=jnp.float32
    )

  @pl.when((g == pl.num_programs(3) - 1) & (s == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[...] = dk_sc[...]
    dv_ref[...] = dv_sc[...]


# ---------------------------------------------------------------------------------------------
# pallas_call wiring.


def _compiler_params(*semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _tables(schedule: TileSchedule, transposed: bool):
  """(Scalar-prefetched tile lists, int8 mask tiles `[num_masks, T, T]`).

  The lists are flat (1-D arrays pad least in SMEM); int8 masks move a quarter of the bytes of
  int32 per tile.
  """
  if transposed:
    lists = (schedule.q_tiles, schedule.q_counts, schedule.mask_ids_t)
  else:
    lists = (schedule.kv_tiles, schedule.kv_counts, schedule.mask_ids)
  prefetch = [jnp.asarray(x, jnp.int32).reshape(-1) for x in lists]
  return prefetch, jnp.asarray(schedule.mask_table, jnp.int8)


def _specs_over_kv_lists(st: _Static, q, k, v):
  """Grid `[batch, heads, query tiles, steps]` walking each query tile's key tiles.

  Returns (grid, `q_rows(width)`: the `[T, width]` block of the query tile, [k, v, mask] blocks
  of the step).
  """
  batch, heads, _, head_dim = q.shape
  groups, value_dim = heads // k.shape[1], v.shape[3]
  tile, steps = st.schedule.tile_size, st.schedule.kv_tiles.shape[1]

  def kv_map(b, h, i, s, kv, counts, ids):
    # lax.div, not //: jnp floor division lowers via `sign`, which asks for the TPU generation.
    return b, lax.div(h, groups), kv[i * steps + s], 0

  def mask_map(b, h, i, s, kv, counts, ids):
    return ids[i * steps + s], 0, 0

  def q_rows(width):
    return pl.BlockSpec(
      (pl.Squeezed(), pl.Squeezed(), tile, width), lambda b, h, i, *_: (b, h, i, 0)
    )

  step_specs = [
    pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), tile, head_dim), kv_map),
    pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), tile, value_dim), kv_map),
    pl.BlockSpec((pl.Squeezed(), tile, tile), mask_map),
  ]
  return (batch, heads, st.schedule.num_tiles, steps), q_rows, step_specs


def _forward_call(st: _Static, q, k, v):
  batch, heads, n, head_dim = q.shape
  value_dim = v.shape[3]
  tile = st.schedule.tile_size
  grid, q_rows, step_specs = _specs_over_kv_lists(st, q, k, v)
  prefetch, mask_table = _tables(st.schedule, transposed=False)
  return pl.pallas_call(
    functools.partial(_forward_kernel, st=st),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=grid,
      in_specs=[q_rows(head_dim), *step_specs],
      out_specs=[q_rows(value_dim), q_rows(1)],
      scratch_shapes=[
        pltpu.VMEM((tile, 1), jnp.float32),
        pltpu.VMEM((tile, 1), jnp.float32),
        pltpu.VMEM((tile, value_dim), jnp.float32),
      ],
    ),
    out_shape=[
      jax.ShapeDtypeStruct((batch, heads, n, value_dim), q.dtype),
      jax.ShapeDtypeStruct((batch, heads, n, 1), jnp.float32),
    ],
    compiler_params=_compiler_params("parallel", "parallel", "parallel", "arbitrary"),
    interpret=st.interpret,
  )(*prefetch, q, k, v, mask_table)


def _dq_call(st: _Static, q, k, v, d_out, lse, delta):
  head_dim, value_dim = q.shape[3], v.shape[3]
  grid, q_rows, step_specs = _specs_over_kv_lists(st, q, k, v)
  prefetch, mask_table = _tables(st.schedule, transposed=False)
  return pl.pallas_call(
    functools.partial(_dq_kernel, st=st),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=grid,
      in_specs=[q_rows(head_dim), *step_specs, q_rows(value_dim), q_rows(1), q_rows(1)],
      out_specs=q_rows(head_dim),
      scratch_shapes=[pltpu.VMEM((st.schedule.tile_size, head_dim), jnp.float32)],
    ),
    out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
    compiler_params=_compiler_params("parallel", "parallel", "parallel", "arbitrary"),
    interpret=st.interpret,
  )(*prefetch, q, k, v, mask_table, d_out, lse, delta)


def _dkv_call(st: _Static, q, k, v, d_out, lse, delta):
  """Grid `[batch, kv_heads, key tiles, groups, steps]`: each key tile walks the query tiles of
  each query head of its GQA group."""
  batch, kv_heads, n, head_dim = k.shape
  groups, value_dim = q.shape[1] // kv_heads, v.shape[3]
  tile, steps = st.schedule.tile_size, st.schedule.q_tiles.shape[1]

  def kv_map(b, h, j, g, s, qt, counts, ids):
    return b, h, j, 0

  def q_map(b, h, j, g, s, qt, counts, ids):
    return b, h * groups + g, qt[j * steps + s], 0

  def mask_map(b, h, j, g, s, qt, counts, ids):
    return ids[j * steps + s], 0, 0

  rows = functools.partial(pl.BlockSpec, index_map=q_map)
  prefetch, mask_table = _tables(st.schedule, transposed=True)
  return pl.pallas_call(
    functools.partial(_dkv_kernel, st=st),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(batch, kv_heads, st.schedule.num_tiles, groups, steps),
      in_specs=[
        rows((pl.Squeezed(), pl.Squeezed(), tile, head_dim)),
        pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), tile, head_dim), kv_map),
        pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), tile, value_dim), kv_map),
        pl.BlockSpec((pl.Squeezed(), tile, tile), mask_map),
        rows((pl.Squeezed(), pl.Squeezed(), tile, value_dim)),
        rows((pl.Squeezed(), pl.Squeezed(), tile, 1)),
        rows((pl.Squeezed(), pl.Squeezed(), tile, 1)),
      ],
      out_specs=[
        pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), tile, head_dim), kv_map),
        pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), tile, value_dim), kv_map),
      ],
      scratch_shapes=[
        pltpu.VMEM((tile, head_dim), jnp.float32),
        pltpu.VMEM((tile, value_dim), jnp.float32),
      ],
    ),
    out_shape=[
      jax.ShapeDtypeStruct((batch, kv_heads, n, head_dim), jnp.float32),
      jax.ShapeDtypeStruct((batch, kv_heads, n, value_dim), jnp.float32),
    ],
    compiler_params=_compiler_params("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
    interpret=st.interpret,
  )(*prefetch, q, k, v, mask_table, d_out, lse, delta)


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
