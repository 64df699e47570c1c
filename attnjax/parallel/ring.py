"""Ring attention: K/V chunks travel around the sequence axis, partial results merge by lse.

Ring Attention (Liu, Zaharia and Abbeel 2023, "Ring Attention with Blockwise Transformers for
Near-Infinite Context"): each of the P devices keeps its queries and passes its key/value
chunk to the next device P - 1 times, attending to each chunk as it passes and merging the
partial softmax results by their log-sum-exp. The permute of the next chunk is issued before
the current chunk's attention so XLA can overlap the two. Causal load balancing uses the
zigzag layout (`attnjax.parallel.layout`): device d holds chunks d and 2P - 1 - d of 2P, so
every device visits the same number of tiles under a causal mask (`visited_tiles`). Arrays
already in that layout (`layout="zigzag"`) start the ring at once; natural-order arrays are
moved there and back inside the call.

The backward pass (custom VJP) runs the ring again, in the opposite direction, with the saved
output and lse: K/V travel together with their float32 gradients, so no device holds more
than two K/V shards at a time and per-device memory stays O(T / P). Each chunk pair's
gradient is the op's own VJP with cotangents re-weighted for the merge:
  out = sum_b w_b out_b, w_b = exp(lse_b - lse)
  d out_b = w_b d out,   d lse_b = w_b (<d out, out_b - out> + d lse).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib
from attnjax.ops.qkv import check_qkv
from attnjax.parallel import chunk_pairs
from attnjax.parallel import layout as layout_lib
from attnjax.parallel import mesh as mesh_lib


def _chunk_ids(device: int, parts: int, zigzag: bool) -> tuple[int, ...]:
  return mesh_lib.zigzag_chunks(device, parts) if zigzag else (device,)


def ring_pairs(
  mask: masks_lib.Mask | None, *, parts: int, chunk_len: int, zigzag: bool, q_offset: int = 0
) -> tuple:
  """Static plan: `plan[step][q_chunk][kv_chunk]` is a tuple over devices of `ChunkPair`.

  At `step`, device d holds the K/V of device (d - step) mod P; `q_chunk` / `kv_chunk`
  index the chunks a device holds (two in the zigzag layout, one otherwise).
  """
  n = 2 if zigzag else 1
  plan = []
  for step in range(parts):
    per_chunk = []
    for qi in range(n):
      row = []
      for kj in range(n):
        pairs = []
        for d in range(parts):
          q_chunk = _chunk_ids(d, parts, zigzag)[qi]
          kv_chunk = _chunk_ids((d - step) % parts, parts, zigzag)[kj]
          q_start, kv_start = q_chunk * chunk_len + q_offset, kv_chunk * chunk_len
          pairs.append(chunk_pairs.classify(mask, q_start, chunk_len, kv_start, chunk_len))
        row.append(tuple(pairs))
      per_chunk.append(tuple(row))
    plan.append(tuple(per_chunk))
  return tuple(plan)


def visited_tiles(
  mask: masks_lib.Mask | None, seq_len: int, parts: int, *, zigzag: bool = True, block: int = 64
) -> np.ndarray:
  """int `[parts]`: tiles of `block x block` each device visits over the whole ring."""
  chunk_len = seq_len // (2 * parts if zigzag else parts)
  plan = ring_pairs(mask, parts=parts, chunk_len=chunk_len, zigzag=zigzag)
  full = (-(-chunk_len // block)) ** 2
  counts = np.zeros(parts, np.int64)
  for step_plan in plan:
    for row in step_plan:
      for pairs in row:
        for d, pair in enumerate(pairs):
          if pair.kind == masks_lib.FULL:
            counts[d] += full
          elif pair.kind == masks_lib.PARTIAL:
            bm = masks_lib.block_mask(pair.mask, chunk_len, chunk_len, block, block)
            counts[d] += int(bm.kv_counts.sum())
  return counts


@dataclasses.dataclass(frozen=True, eq=False)
class _Ring:
  call: chunk_pairs.SoftmaxCall
  axis: str
  parts: int
  chunks: int  # chunks per device: 2 (zigzag) or 1
  chunk_len: int
  plan: tuple


def _chunk(x, i: int, size: int):
  return None if x is None else x[:, i * size : (i + 1) * size]


def _rotate(cfg: _Ring, tree, shift: int = 1):
  perm = [(d, (d + shift) % cfg.parts) for d in range(cfg.parts)]
  return jax.lax.ppermute(tree, cfg.axis, perm)


def _pair(cfg: _Ring, step: int, qi: int, kj: int, device, q_c, k_c, v_c, seg_q_c, seg_kv_c):
  """(out, lse) of query chunk `qi` against the `kj`-th K/V chunk held at `step`."""
  segments = chunk_pairs.local_segments(seg_q_c, seg_kv_c, cfg.call.padding_id)
  pairs = cfg.plan[step][qi][kj]
  return chunk_pairs.switch_pairs(
    pairs, device, cfg.call.op, cfg.call.op_kwargs, q_c, k_c, v_c, segments
  )


def _forward(cfg: _Ring, q, k, v, seg_q, seg_kv):
  device = jax.lax.axis_index(cfg.axis)
  outs, lses = [None] * cfg.chunks, [None] * cfg.chunks
  held = (k, v, seg_kv)
  for step in range(cfg.parts):
    incoming = _rotate(cfg, held) if step < cfg.parts - 1 else None
    for qi in range(cfg.chunks):
      for kj in range(cfg.chunks):
        k_held, v_held, seg_held = (_chunk(x, kj, cfg.chunk_len) for x in held)
        q_c, seg_q_c = _chunk(q, qi, cfg.chunk_len), _chunk(seg_q, qi, cfg.chunk_len)
        out, lse = _pair(cfg, step, qi, kj, device, q_c, k_held, v_held, seg_q_c, seg_held)
        if outs[qi] is None:
          outs[qi], lses[qi] = out.astype(jnp.float32), lse
        else:
          outs[qi], lses[qi] = chunk_pairs.merge(outs[qi], lses[qi], out, lse)
    held = incoming
  return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg: _Ring, q, k, v, seg_q, seg_kv):
  return _forward(cfg, q, k, v, seg_q, seg_kv)


def _ring_fwd(cfg: _Ring, q, k, v, seg_q, seg_kv):
  out, lse = _forward(cfg, q, k, v, seg_q, seg_kv)
  return (out, lse), (q, k, v, seg_q, seg_kv, out, lse)


def _ring_bwd(cfg: _Ring, residuals, cotangents):
  q, k, v, seg_q, seg_kv, out, lse = residuals
  d_out, d_lse = cotangents
  device = jax.lax.axis_index(cfg.axis)
  c = cfg.chunk_len
  dq = jnp.zeros(q.shape, jnp.float32)
  d_held = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  # K/V travel the other way round: permutes equal to the forward pass's would be merged
  # with them by XLA, keeping every K/V chunk alive from the forward to the backward pass.
  held = (k, v, seg_kv)
  for reverse_step in range(cfg.parts):
    step = (cfg.parts - reverse_step) % cfg.parts  # device d holds the K/V of d + reverse_step
    incoming = _rotate(cfg, held, -1) if reverse_step < cfg.parts - 1 else None
    dk_parts, dv_parts = [], []
    for kj in range(cfg.chunks):
      dk_chunk, dv_chunk = 0.0, 0.0
      for qi in range(cfg.chunks):
        chunk_attention = functools.partial(
          _pair,
          cfg,
          step,
          qi,
          kj,
          device,
          seg_q_c=_chunk(seg_q, qi, c),
          seg_kv_c=_chunk(held[2], kj, c),
        )
        (out_b, lse_b), pair_vjp = jax.vjp(
          chunk_attention, _chunk(q, qi, c), _chunk(held[0], kj, c), _chunk(held[1], kj, c)
        )
        lse_c = _chunk(lse, qi, c)
        weight = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - lse_c), 0.0)
        d_out_c = _chunk(d_out, qi, c).astype(jnp.float32)
        d_out_b = weight[..., None] * d_out_c
        spread = jnp.sum(d_out_c * (out_b.astype(jnp.float32) - _chunk(out, qi, c)), axis=-1)
        d_lse_b = weight * (spread + _chunk(d_lse, qi, c))
        dq_b, dk_b, dv_b = pair_vjp((d_out_b.astype(out_b.dtype), d_lse_b))
        dq = dq.at[:, qi * c : (qi + 1) * c].add(dq_b.astype(jnp.float32))
        dk_chunk = dk_chunk + dk_b.astype(jnp.float32)
        dv_chunk = dv_chunk + dv_b.astype(jnp.float32)
      dk_parts.append(dk_chunk)
      dv_parts.append(dv_chunk)
    step_grads = (jnp.concatenate(dk_parts, axis=1), jnp.concatenate(dv_parts, axis=1))
    d_held = _rotate(cfg, jax.tree.map(jnp.add, d_held, step_grads), -1)
    held = incoming
  dk, dv = d_held
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def attention(
  call: chunk_pairs.SoftmaxCall,
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  seg_q: jax.Array | None,
  seg_kv: jax.Array | None,
  sinks: jax.Array | None,
  *,
  mesh: jax.sharding.Mesh,
  axis: str,
  batch_axes: mesh_lib.BatchAxes = None,
  zigzag: bool = True,
  layout: layout_lib.Layout = "natural",
) -> tuple[jax.Array, jax.Array]:
  """Ring attention of global `q [b, T, h, d]`, `k`, `v [b, T, hk, d|dv]` sharded over `axis`.

  Returns (out `[b, T, h, dv]` in q's dtype, float32 lse `[b, T, h]`), equal to
  `call.op(q, k, v, ...)` on one device. `T` must split into P (zigzag: 2P) equal chunks.
  `zigzag`: balance causal work with the zigzag chunks (else contiguous shards).
  `layout`: the order of the given arrays (and of the results, see `attnjax.parallel.layout`):
  "natural" (moved to the zigzag layout and back inside) or "zigzag" (already there, as a
  model that lays its tokens out once keeps them: no device exchanges queries or outputs).
  """
  shape = check_qkv(q, k, v, same_length=True)
  layout_lib.check_layout(layout)
  if layout == "zigzag" and not zigzag:
    raise ValueError("layout='zigzag' needs zigzag=True (contiguous shards are natural order)")
  relayout = zigzag and layout == "natural"
  parts = mesh_lib.axis_size(mesh, axis)
  local_len = mesh_lib.check_split(shape.q_len, parts, strategy="ring", zigzag=zigzag)
  chunks = 2 if zigzag else 1
  chunk_len = local_len // chunks
  cfg = _Ring(
    call=call,
    axis=axis,
    parts=parts,
    chunks=chunks,
    chunk_len=chunk_len,
    plan=ring_pairs(
      call.mask, parts=parts, chunk_len=chunk_len, zigzag=zigzag, q_offset=call.q_offset
    ),
  )

  def per_device(q, k, v, seg_q, seg_kv, sinks):
    if relayout:
      q, k, v, seg_q, seg_kv = (
        None if x is None else mesh_lib.to_zigzag(x, axis, parts) for x in (q, k, v, seg_q, seg_kv)
      )
    out, lse = _ring(cfg, q, k, v, seg_q, seg_kv)
    if sinks is not None:
      out, lse = chunk_pairs.add_sinks(out, lse, sinks)
    out = out.astype(q.dtype)
    if relayout:
      out, lse = mesh_lib.from_zigzag(out, axis, parts), mesh_lib.from_zigzag(lse, axis, parts)
    return out, lse

  spec4, spec2 = mesh_lib.seq_spec(4, axis, batch_axes), mesh_lib.seq_spec(2, axis, batch_axes)
  return jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(spec4, spec4, spec4, spec2, spec2, jax.sharding.PartitionSpec()),
    out_specs=(spec4, mesh_lib.seq_spec(3, axis, batch_axes)),
    check_vma=False,
  )(q, k, v, seg_q, seg_kv, sinks)
