"""All-gather attention: every device gathers the whole K/V once and attends its queries.

Context parallelism of Llama 3 (Grattafiori et al. 2024, "The Llama 3 Herd of Models", sec.
3.3.2): K/V (small under GQA) are all-gathered along the sequence axis, then each device runs
the op on its own query shard against the full sequence. The backward pass is JAX's: the
transpose of the all-gather reduce-scatters dK and dV. Shards are contiguous; under a causal
mask the op's block-sparse schedule skips the empty tiles, so the total work is the minimum
but later devices do more of it than earlier ones.
"""

from __future__ import annotations

import jax

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
  """All-gather attention of global `q [b, T, h, d]`, `k`, `v [b, T, hk, d|dv]`.

  Returns (out `[b, T, h, dv]` in q's dtype, float32 lse `[b, T, h]`), equal to
  `call.op(q, k, v, ...)` on one device. `T` must split into P equal shards.
  """
  shape = check_qkv(q, k, v, same_length=True)
  parts = mesh_lib.axis_size(mesh, axis)
  local_len = mesh_lib.check_split(shape.q_len, parts, strategy="allgather")
  pairs = tuple(
    chunk_pairs.classify(call.mask, d * local_len + call.q_offset, local_len, 0, shape.kv_len)
    for d in range(parts)
  )

  def per_device(q, k, v, seg_q, seg_kv, sinks):
    k_all, v_all, seg_kv_all = (
      None if x is None else jax.lax.all_gather(x, axis, axis=1, tiled=True) for x in (k, v, seg_kv)
    )
    segments = chunk_pairs.local_segments(seg_q, seg_kv_all, call.padding_id)
    device = jax.lax.axis_index(axis)
    out, lse = chunk_pairs.switch_pairs(
      pairs, device, call.op, call.op_kwargs, q, k_all, v_all, segments
    )
    if sinks is not None:
      out, lse = chunk_pairs.add_sinks(out, lse, sinks)
    return out, lse

  spec4, spec2 = mesh_lib.seq_spec(4, axis, batch_axes), mesh_lib.seq_spec(2, axis, batch_axes)
  return jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(spec4, spec4, spec4, spec2, spec2, jax.sharding.PartitionSpec()),
    out_specs=(spec4, mesh_lib.seq_spec(3, axis, batch_axes)),
    check_vma=False,
  )(q, k, v, seg_q, seg_kv, sinks)
