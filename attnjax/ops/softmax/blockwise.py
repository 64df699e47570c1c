"""Blockwise (flash) softmax attention in pure JAX that visits only a BlockMask's live tiles.

The tiles of a `BlockMask` are packed into `lanes`: each lane runs a sequence of
(query block, kv block) tiles, whole query-block rows one after another, and one `lax.scan`
step advances every lane by one tile. Rows are assigned to lanes longest first onto the
least-loaded lane (LPT scheduling), with as many lanes as the longest row and a memory
budget for the per-step logits allow, so the scan length is about (live tiles) / lanes and
empty tiles cost nothing: a causal mask does about half the work of a full one and a
12.5%-dense mask an eighth.

Within a lane the online softmax of FlashAttention (Dao et al. 2022; Dao 2023, FA-2) runs
over the row's kv tiles and is reset at each row's first tile; a row's output is written
at its last. The backward pass (custom VJP) replays the same schedule, recomputing
probabilities from the saved log-sum-exp: dq is accumulated per lane, dk and dv are
scatter-added per tile. Memory is linear in the sequence length in both passes.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib
from attnjax.ops.qkv import QKVShape
from kernels_pallas.block_sparse.common import BlockSizes

LOGITS_BUDGET_BYTES = 16 * 2**20


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """Per-lane tile sequences, each array `[steps, lanes]` (step-major for `lax.scan`).

  `row` = mask_head * num_q_blocks + q block; `col` = kv block; `kind` is EMPTY for the
  padding at the end of short lanes; `first` / `last` mark a row's first and last tile.
  """

  row: np.ndarray
  col: np.ndarray
  kind: np.ndarray
  partial_id: np.ndarray
  first: np.ndarray
  last: np.ndarray
  block_mask: masks_lib.BlockMask

  @property
  def steps(self) -> int:
    return self.row.shape[0]

  @property
  def lanes(self) -> int:
    return self.row.shape[1]


def make_schedule(bm: masks_lib.BlockMask, max_lanes: int | None = None) -> Schedule:
  """Packs the rows of `bm` into at most `max_lanes` lanes, wasting the fewest steps."""
  counts = bm.kv_counts.reshape(-1)
  rows = [int(r) for r in np.argsort(-counts, kind="stable") if counts[r] > 0]
  longest = int(counts.max(initial=0))
  limit = max(1, min(len(rows), max_lanes or len(rows)))
  fewest = max(1, min(limit, int(counts.sum()) // max(longest, 1)))
  candidates = {min(limit, n) for n in (fewest, fewest + 1, fewest + 2, limit)}
  plans = [_pack_rows(rows, counts, max(n, 1)) for n in sorted(candidates)]
  lane_rows, steps = min(plans, key=lambda plan: (plan[1] * len(plan[0]), plan[1]))
  lanes = len(lane_rows)
  fields = {name: np.zeros((lanes, steps), np.int32) for name in ("row", "col", "kind", "pid")}
  first, last = np.zeros((lanes, steps), bool), np.zeros((lanes, steps), bool)
  flat = {
    "col": bm.kv_indices.reshape(len(counts), -1),
    "kind": bm.kv_kinds.reshape(len(counts), -1),
    "pid": bm.partial_ids.reshape(len(counts), -1),
  }
  for lane, assigned in enumerate(lane_rows):
    t = 0
    for r in assigned:
      n = int(counts[r])
      fields["row"][lane, t : t + n] = r
      for name, table in flat.items():
        fields[name][lane, t : t + n] = table[r, :n]
      first[lane, t], last[lane, t + n - 1] = True, True
      t += n
    if 0 < t < steps:  # padding: repeat the last tile as EMPTY (no update, no write)
      fields["row"][lane, t:] = fields["row"][lane, t - 1]
      fields["col"][lane, t:] = fields["col"][lane, t - 1]
  return Schedule(
    row=fields["row"].T.copy(),
    col=fields["col"].T.copy(),
    kind=fields["kind"].T.copy(),
    partial_id=fields["pid"].T.copy(),
    first=first.T.copy(),
    last=last.T.copy(),
    block_mask=bm,
  )


def _pack_rows(rows: list[int], counts: np.ndarray, lanes: int) -> tuple[list[list[int]], int]:
  """LPT: rows (longest first) each go to the least-loaded lane; returns (lanes, steps)."""
  heap = [(0, lane) for lane in range(lanes)]
  lane_rows: list[list[int]] = [[] for _ in range(lanes)]
  for r in rows:
    load, lane = heapq.heappop(heap)
    lane_rows[lane].append(r)
    heapq.heappush(heap, (load + int(counts[r]), lane))
  return lane_rows, max((load for load, _ in heap), default=0)


@functools.lru_cache(maxsize=64)
def cached_schedule(mask, q_len, kv_len, block_q, block_kv, q_offset, max_lanes=None) -> Schedule:
  bm = masks_lib.block_mask(mask, q_len, kv_len, block_q, block_kv, q_offset=q_offset)
  return make_schedule(bm, max_lanes)


@dataclasses.dataclass(frozen=True, eq=False)
class _Config:
  """Static description of one call (hashable by identity for `nondiff_argnums`)."""

  schedule: Schedule
  shape: QKVShape
  scale: float
  softcap: float | None
  has_sinks: bool
  has_segments: bool
  padding_id: int | None

  @property
  def per_head(self) -> bool:
    return self.schedule.block_mask.mask_heads > 1

  @property
  def head_split(self) -> tuple[int, int, int]:
    """(row heads R, kv heads per row, query groups per row)."""
    s = self.shape
    return (s.heads, 1, 1) if self.per_head else (1, s.kv_heads, s.groups)


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  shape: QKVShape,
  mask: masks_lib.Mask | None,
  segment_ids: masks_lib.SegmentIds | None,
  scale: float,
  softcap: float | None,
  sinks: jax.Array | None,
  q_offset: int,
  block_sizes: BlockSizes | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Same function and arguments as `reference.attention`; memory linear in sequence length."""
  blocks = (block_sizes or BlockSizes()).fit(shape.q_len, shape.kv_len)
  # Each lane holds float32 logits [batch, heads, block_q, block_kv] per step; past a few
  # MiB of them a step is memory-bound (measured on CPU: 2 lanes of 8 MiB beat 16 lanes by
  # 2.4x per tile), so lanes are capped by this budget and the scan runs longer instead.
  lane_bytes = 4 * shape.batch * shape.heads * blocks.block_q * blocks.block_kv
  max_lanes = max(1, LOGITS_BUDGET_BYTES // lane_bytes)
  schedule = cached_schedule(
    mask, shape.q_len, shape.kv_len, blocks.block_q, blocks.block_kv, q_offset, max_lanes
  )
  cfg = _Config(
    schedule=schedule,
    shape=shape,
    scale=scale,
    softcap=softcap,
    has_sinks=sinks is not None,
    has_segments=segment_ids is not None,
    padding_id=None if segment_ids is None else segment_ids.padding_id,
  )
  bm = schedule.block_mask
  n_q, n_kv = bm.num_q_blocks * bm.block_q, bm.num_kv_blocks * bm.block_kv
  if segment_ids is None:
    seg_q = jnp.zeros((shape.batch, n_q), jnp.int32)
    seg_kv = jnp.zeros((shape.batch, n_kv), jnp.int32)
  else:
    seg_q = _pad_axis(segment_ids.q.astype(jnp.int32), 1, n_q)
    seg_kv = _pad_axis(segment_ids.kv_ids.astype(jnp.int32), 1, n_kv)
  sinks = jnp.zeros((shape.heads,), jnp.float32) if sinks is None else sinks
  out, lse = _flash(cfg, q, k, v, sinks.astype(jnp.float32), seg_q, seg_kv)
  return out.astype(q.dtype), lse


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _q_rows(cfg: _Config, x: jax.Array) -> jax.Array:
  """`[b, t, heads, d]` -> `[rows, b, kv_heads_r, groups_r, block_q, d]`, rows = R * n_qb."""
  bm = cfg.schedule.block_mask
  r, hk, g = cfg.head_split
  b, d = x.shape[0], x.shape[-1]
  x = _pad_axis(x, 1, bm.num_q_blocks * bm.block_q)
  x = x.reshape(b, bm.num_q_blocks, bm.block_q, r, hk, g, d).transpose(3, 1, 0, 4, 5, 2, 6)
  return x.reshape(r * bm.num_q_blocks, b, hk, g, bm.block_q, d)


def _q_rows_inverse(cfg: _Config, x: jax.Array) -> jax.Array:
  """Inverse of `_q_rows` (trailing dims after block_q kept), sliced to q_len."""
  bm = cfg.schedule.block_mask
  r, hk, g = cfg.head_split
  b, tail = x.shape[1], x.shape[5:]
  x = x.reshape(r, bm.num_q_blocks, b, hk, g, bm.block_q, *tail)
  x = x.transpose(2, 1, 5, 0, 3, 4, *range(6, x.ndim))
  x = x.reshape(b, bm.num_q_blocks * bm.block_q, r * hk * g, *tail)
  return x[:, : cfg.shape.q_len]


def _kv_rows(cfg: _Config, x: jax.Array) -> jax.Array:
  """`[b, t, kv_heads, d]` -> `[kv_rows, b, kv_heads_r, block_kv, d]`."""
  bm = cfg.schedule.block_mask
  r, hk, _ = cfg.head_split
  rk = cfg.shape.kv_heads // hk
  b, d = x.shape[0], x.shape[-1]
  x = _pad_axis(x, 1, bm.num_kv_blocks * bm.block_kv)
  x = x.reshape(b, bm.num_kv_blocks, bm.block_kv, rk, hk, d).transpose(3, 1, 0, 4, 2, 5)
  return x.reshape(rk * bm.num_kv_blocks, b, hk, bm.block_kv, d)


def _kv_rows_inverse(cfg: _Config, x: jax.Array) -> jax.Array:
  bm = cfg.schedule.block_mask
  _, hk, _ = cfg.head_split
  rk = cfg.shape.kv_heads // hk
  b, d = x.shape[1], x.shape[-1]
  x = x.reshape(rk, bm.num_kv_blocks, b, hk, bm.block_kv, d).transpose(2, 1, 4, 0, 3, 5)
  return x.reshape(b, bm.num_kv_blocks * bm.block_kv, rk * hk, d)[:, : cfg.shape.kv_len]


def _step_tables(cfg: _Config):
  """Scan inputs: per step and lane, the q row, kv row, kind, tile id, first/last flags."""
  sch, bm = cfg.schedule, cfg.schedule.block_mask
  mask_head = sch.row // bm.num_q_blocks
  kv_head_row = (mask_head // cfg.shape.groups) if cfg.per_head else np.zeros_like(mask_head)
  return {
    "q_row": jnp.asarray(sch.row),
    "q_block": jnp.asarray(sch.row % bm.num_q_blocks),
    "kv_row": jnp.asarray(kv_head_row * bm.num_kv_blocks + sch.col),
    "kv_block": jnp.asarray(sch.col),
    "kind": jnp.asarray(sch.kind),
    "partial_id": jnp.asarray(sch.partial_id),
    "first": jnp.asarray(sch.first),
    "last": jnp.asarray(sch.last),
  }


def _logits(cfg: _Config, q_tile, k_tile, allowed):
  """Scaled, capped, masked logits `[lanes, b, hk, g, bq, bkv]` and the cap's tanh."""
  s = jnp.einsum(
    "lbhgqd,lbhkd->lbhgqk", q_tile, k_tile, preferred_element_type=jnp.float32
  ) * jnp.float32(cfg.scale)
  capped = None
  if cfg.softcap is not None:
    capped = jnp.tanh(s / cfg.softcap)
    s = cfg.softcap * capped
  return jnp.where(allowed, s, -jnp.inf), capped


def _allowed(cfg: _Config, tiles, seg_q, seg_kv, step):
  """Boolean `[lanes, b, 1, 1, bq, bkv]`: the tile's mask, its segments, live steps only."""
  kind = step["kind"][:, None, None]
  allowed = (kind == masks_lib.FULL) | ((kind == masks_lib.PARTIAL) & tiles[step["partial_id"]])
  allowed = allowed[:, None]
  if cfg.has_segments:
    q_ids, kv_ids = seg_q[step["q_block"]], seg_kv[step["kv_block"]]
    same = q_ids[..., :, None] == kv_ids[..., None, :]
    if cfg.padding_id is not None:
      same &= (q_ids != cfg.padding_id)[..., :, None]
    allowed = allowed & same
  return allowed[:, :, None, None]


def _segment_blocks(cfg: _Config, seg_q, seg_kv):
  bm = cfg.schedule.block_mask
  b = seg_q.shape[0]
  seg_q = seg_q.reshape(b, bm.num_q_blocks, bm.block_q).transpose(1, 0, 2)
  seg_kv = seg_kv.reshape(b, bm.num_kv_blocks, bm.block_kv).transpose(1, 0, 2)
  return seg_q, seg_kv


def _sink_rows(cfg: _Config, sinks):
  """Per-row sink logits `[rows, 1, hk, g, 1]`."""
  r, hk, g = cfg.head_split
  n_qb = cfg.schedule.block_mask.num_q_blocks
  per_head = jnp.broadcast_to(sinks.reshape(r, 1, 1, hk, g, 1), (r, n_qb, 1, hk, g, 1))
  return per_head.reshape(r * n_qb, 1, hk, g, 1)


def _forward(cfg: _Config, q, k, v, sinks, seg_q, seg_kv):
  """Returns (out rows `[rows, b, hk, g, bq, dv]` f32, lse rows `[rows, b, hk, g, bq]`)."""
  bm = cfg.schedule.block_mask
  q_r, k_r, v_r = _q_rows(cfg, q), _kv_rows(cfg, k), _kv_rows(cfg, v)
  seg_q, seg_kv = _segment_blocks(cfg, seg_q, seg_kv)
  tiles = jnp.asarray(bm.partial_tiles)
  sink_rows = _sink_rows(cfg, sinks)
  n_rows, b, hk, g, bq, _ = q_r.shape
  dv = v_r.shape[-1]
  lanes = cfg.schedule.lanes
  init_lse = sink_rows if cfg.has_sinks else jnp.full((n_rows, 1, hk, g, 1), -jnp.inf)
  out_r = jnp.zeros((n_rows, b, hk, g, bq, dv), jnp.float32)
  lse_r = jnp.broadcast_to(init_lse, (n_rows, b, hk, g, bq))
  state = (
    jnp.full((lanes, b, hk, g, bq), -jnp.inf),
    jnp.zeros((lanes, b, hk, g, bq)),
    jnp.zeros((lanes, b, hk, g, bq, dv)),
  )

  def body(carry, step):
    (row_max, row_sum, acc), out_r, lse_r = carry
    first = step["first"][:, None, None, None, None]
    row_max = jnp.where(first, -jnp.inf, row_max)
    row_sum = jnp.where(first, 0.0, row_sum)
    acc = jnp.where(first[..., None], 0.0, acc)
    allowed = _allowed(cfg, tiles, seg_q, seg_kv, step)
    s, _ = _logits(cfg, q_r[step["q_row"]], k_r[step["kv_row"]], allowed)
    new_max = jnp.maximum(row_max, s.max(-1))
    shift = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
    probs = jnp.exp(s - shift[..., None])
    correction = jnp.exp(row_max - shift)
    row_sum = row_sum * correction + probs.sum(-1)
    v_tile = v_r[step["kv_row"]]
    acc = acc * correction[..., None] + jnp.einsum(
      "lbhgqk,lbhkd->lbhgqd", probs.astype(v_tile.dtype), v_tile, preferred_element_type=jnp.float32
    )
    row_max = new_max
    total = row_sum
    if cfg.has_sinks:
      total = total + jnp.exp(sink_rows[step["q_row"]] - shift)
    live = total > 0
    safe_total = jnp.where(live, total, 1.0)
    out_tile = acc / safe_total[..., None]
    lse_tile = jnp.where(live, jnp.log(safe_total) + shift, -jnp.inf)
    write = jnp.where(step["last"], step["q_row"], n_rows)  # out of range: dropped
    out_r = out_r.at[write].set(out_tile, mode="drop")
    lse_r = lse_r.at[write].set(lse_tile, mode="drop")
    return ((row_max, row_sum, acc), out_r, lse_r), None

  (_, out_r, lse_r), _ = jax.lax.scan(body, (state, out_r, lse_r), _step_tables(cfg))
  return out_r, lse_r


def _backward(cfg: _Config, residuals, d_out, d_lse):
  q, k, v, sinks, seg_q, seg_kv, out_r, lse_r = residuals
  bm = cfg.schedule.block_mask
  q_r, k_r, v_r = _q_rows(cfg, q), _kv_rows(cfg, k), _kv_rows(cfg, v)
  seg_q, seg_kv = _segment_blocks(cfg, seg_q, seg_kv)
  tiles = jnp.asarray(bm.partial_tiles)
  d_out_r = _q_rows(cfg, d_out.astype(jnp.float32))
  d_lse_r = _q_rows(cfg, d_lse[..., None])[..., 0]
  # FA-2: dS = P * (dP - delta) with delta = rowsum(dO * O); an lse cotangent adds P * dlse.
  delta = (d_out_r * out_r).sum(-1) - d_lse_r
  finite_lse = jnp.where(jnp.isfinite(lse_r), lse_r, 0.0)
  n_rows, b, hk, g, bq, d = q_r.shape
  lanes = cfg.schedule.lanes
  dq_r = jnp.zeros((n_rows, b, hk, g, bq, d), jnp.float32)
  dk_r = jnp.zeros(k_r.shape, jnp.float32)
  dv_r = jnp.zeros(v_r.shape, jnp.float32)
  dq_acc = jnp.zeros((lanes, b, hk, g, bq, d), jnp.float32)

  def body(carry, step):
    dq_acc, dq_r, dk_r, dv_r = carry
    dq_acc = jnp.where(step["first"][:, None, None, None, None, None], 0.0, dq_acc)
    q_tile, k_tile, v_tile = q_r[step["q_row"]], k_r[step["kv_row"]], v_r[step["kv_row"]]
    allowed = _allowed(cfg, tiles, seg_q, seg_kv, step)
    s, capped = _logits(cfg, q_tile, k_tile, allowed)
    probs = jnp.where(allowed, jnp.exp(s - finite_lse[step["q_row"]][..., None]), 0.0)
    d_out_tile = d_out_r[step["q_row"]]
    d_probs = jnp.einsum("lbhgqd,lbhkd->lbhgqk", d_out_tile, v_tile.astype(jnp.float32))
    d_s = probs * (d_probs - delta[step["q_row"]][..., None])
    if capped is not None:
      d_s = d_s * (1.0 - capped * capped)
    d_s = d_s * jnp.float32(cfg.scale)
    dq_acc = dq_acc + jnp.einsum("lbhgqk,lbhkd->lbhgqd", d_s, k_tile.astype(jnp.float32))
    dk_tile = jnp.einsum("lbhgqk,lbhgqd->lbhkd", d_s, q_tile.astype(jnp.float32))
    dv_tile = jnp.einsum("lbhgqk,lbhgqd->lbhkd", probs, d_out_tile)
    dk_r = dk_r.at[step["kv_row"]].add(dk_tile)
    dv_r = dv_r.at[step["kv_row"]].add(dv_tile)
    write = jnp.where(step["last"], step["q_row"], n_rows)
    dq_r = dq_r.at[write].set(dq_acc, mode="drop")
    return (dq_acc, dq_r, dk_r, dv_r), None

  (_, dq_r, dk_r, dv_r), _ = jax.lax.scan(body, (dq_acc, dq_r, dk_r, dv_r), _step_tables(cfg))
  dq = _q_rows_inverse(cfg, dq_r).astype(q.dtype)
  dk = _kv_rows_inverse(cfg, dk_r).astype(k.dtype)
  dv = _kv_rows_inverse(cfg, dv_r).astype(v.dtype)
  d_sinks = jnp.zeros_like(sinks)
  if cfg.has_sinks:
    # d lse / d sink = p_sink = exp(sink - lse); the sink carries no value, so
    # d loss / d sink = -sum over rows of p_sink * delta.
    p_sink = jnp.exp(_sink_rows(cfg, sinks) - finite_lse) * jnp.isfinite(lse_r)
    per_row = -(p_sink * delta).sum(axis=(1, 4))  # [rows, hk, g]
    r, hk_r, g_r = cfg.head_split
    d_sinks = per_row.reshape(r, bm.num_q_blocks, hk_r, g_r).sum(1).reshape(-1)
  return dq, dk, dv, d_sinks, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, sinks, seg_q, seg_kv):
  out, lse = _flash_fwd(cfg, q, k, v, sinks, seg_q, seg_kv)[0]
  return out, lse


def _flash_fwd(cfg: _Config, q, k, v, sinks, seg_q, seg_kv):
  out_r, lse_r = _forward(cfg, q, k, v, sinks, seg_q, seg_kv)
  out = _q_rows_inverse(cfg, out_r)
  lse = _q_rows_inverse(cfg, lse_r[..., None])[..., 0]
  return (out, lse), (q, k, v, sinks, seg_q, seg_kv, out_r, lse_r)


def _flash_bwd(cfg: _Config, residuals, cotangents):
  d_out, d_lse = cotangents
  return _backward(cfg, residuals, d_out, d_lse)


_flash.defvjp(_flash_fwd, _flash_bwd)
