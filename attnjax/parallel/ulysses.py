"""Ulysses attention: all-to-all from sequence-sharded to head-sharded and back.

DeepSpeed-Ulysses (Jacobs et al. 2023, "DeepSpeed Ulysses: System Optimizations for Enabling
Training of Extreme Long Sequence Transformer Models"): an all-to-all turns each device's
`[b, T/P, h, d]` shard into `[b, T, h/P, d]`, the op runs on the whole sequence for a subset of
heads (masks apply unchanged), and a second all-to-all restores the sequence sharding. Needs
the query heads divisible by P; K/V heads that are not are repeated up to the query heads
(GQA's saving is then lost in communication, not in results). The backward pass is JAX's: the
transpose of an all-to-all is the reverse all-to-all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.ops.qkv import check_qkv
from attnjax.parallel import chunk_pairs
from attnjax.parallel import mesh as mesh_lib


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
) -> tuple[jax.Array, jax.Array]:
  """Ulysses attention of global `q [b, T, h, d]`, `k`, `v [b, T, hk, d|dv]`.

  Returns (out `[b, T, h, dv]` in q's dtype, float32 lse `[b, T, h]`), equal to
  `call.op(q, k, v, ...)` on one device.
  """
  shape = check_qkv(q, k, v, same_length=True)
  parts = mesh_lib.axis_size(mesh, axis)
  mesh_lib.check_split(shape.q_len, parts, strategy="ulysses")
  if shape.heads % parts:
    raise ValueError(
      f"ulysses needs the query heads divisible by the {axis!r} axis size {parts}, got q "
      f"shape {q.shape} with {shape.heads} heads; use strategy 'ring' or 'allgather'"
    )
  if call.mask is not None and call.mask.num_heads is not None:
    raise ValueError(
      f"ulysses splits heads over devices and cannot take a per-head mask (got a mask with "
      f"{call.mask.num_heads} heads); use strategy 'ring' or 'allgather'"
    )
  local_heads = shape.heads // parts
  if shape.kv_heads % parts:
    k, v = (jnp.repeat(x, shape.groups, axis=2) for x in (k, v))

  def per_device(q, k, v, seg_q, seg_kv, sinks):
    q, k, v = (jax.lax.all_to_all(x, axis, 2, 1, tiled=True) for x in (q, k, v))
    seg_q, seg_kv = (
      None if x is None else jax.lax.all_gather(x, axis, axis=1, tiled=True)
      for x in (seg_q, seg_kv)
    )
    if sinks is not None:
      first = jax.lax.axis_index(axis) * local_heads
      sinks = jax.lax.dynamic_slice_in_dim(sinks, first, local_heads)
    # Only arguments that were given reach the op, so a registered variant that fixes its own
    # mask can be called too.
    given = {"mask": call.mask, "sinks": sinks, "q_offset": call.q_offset or None}
    segments = chunk_pairs.local_segments(seg_q, seg_kv, call.padding_id)
    extra = {name: value for name, value in given.items() if value is not None}
    out, lse = call.op(q, k, v, segment_ids=segments, return_lse=True, **extra, **call.op_kwargs)
    return jax.lax.all_to_all(out, axis, 1, 2, tiled=True), jax.lax.all_to_all(
      lse, axis, 1, 2, tiled=True
    )

  spec4, spec2 = mesh_lib.seq_spec(4, axis, batch_axes), mesh_lib.seq_spec(2, axis, batch_axes)
  return jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(spec4, spec4, spec4, spec2, spec2, jax.sharding.PartitionSpec()),
    out_specs=(spec4, mesh_lib.seq_spec(3, axis, batch_axes)),
    check_vma=False,
  )(q, k, v, seg_q, seg_kv, sinks)
