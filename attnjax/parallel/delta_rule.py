"""LASP-2 for the delta rule: one all-gather of per-device (transition, state) summaries.

A shard of the delta rule (`attnjax.ops.delta`) maps the state entering it to the state it
ends in by an affine map, `S_out = M S_in + D`, with `M [key_dim, key_dim]` the product of its
chunks' transitions (a matrix, not LASP-2's diagonal decay: `a_t (I - beta_t k_t k_t^T)`) and
`D` the state it ends in from zero (`chunk.sequence_summary`). Each device computes its
`(M, D)`, all-gathers them (`[P, b, h, dk, dk + dv]` floats, independent of the sequence
length), folds the earlier devices' maps over the initial state to get the state entering its
shard and runs its shard from it. The backward pass is JAX's: the all-gather transposes to a
reduce-scatter of summary gradients.

Packed documents (`segment_ids`): a shard whose first token starts a document (its id differs
from the previous shard's last) drops the state entering it, as the op does inside a shard.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from attnjax.ops.delta import api, chunk
from attnjax.parallel import mesh as mesh_lib


def run_sharded(
  combine: Callable,
  op: Callable,
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  beta: jax.Array,
  log_decay: jax.Array | None,
  initial_state: jax.Array | None,
  segment_ids: jax.Array | None,
  *,
  op_kwargs: tuple[tuple[str, object], ...],
  mesh: jax.sharding.Mesh,
  axis: str,
  batch_axes: mesh_lib.BatchAxes,
  strategy: str,
) -> tuple[jax.Array, jax.Array]:
  """The delta rule on global arrays sharded over `axis`, each device's shard run from the
  state `combine` gives it.

  Inside `shard_map`, `combine(transition [b, h, dk, dk], update [b, h, dk, dv],
  initial_state [b, h, dk, dv], ids [b, t] | None)` -> (state entering this device's first
  token, state leaving its shard), from the device's own summary `S_out = M S_in + D`.
  Returns (out `[b, T, h, dv]`, float32 final state `[b, h, dk, dv]`).
  """
  op_kwargs = dict(op_kwargs)
  mesh_lib.check_split(q.shape[1], mesh_lib.axis_size(mesh, axis), strategy=strategy)
  batch, _, heads, key_dim = q.shape
  if log_decay is None:
    log_decay = jnp.zeros(beta.shape, jnp.float32)
  if initial_state is None:
    initial_state = jnp.zeros((batch, heads, key_dim, v.shape[-1]), jnp.float32)
  ids = jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)

  def per_device(q, k, v, beta, log_decay, initial_state, ids):
    carry = None if segment_ids is None else api.document_carry(ids, *ids.shape)
    transition, update = chunk.sequence_summary(
      q, k, v, beta.astype(jnp.float32), log_decay=log_decay.astype(jnp.float32), carry=carry,
      chunk_size=op_kwargs.get("chunk_size", 64),
    )  # fmt: skip
    documents = None if segment_ids is None else ids
    entering, leaving = combine(transition, update, initial_state.astype(jnp.float32), documents)
    out = op(
      q, k, v, beta, log_decay=log_decay, initial_state=entering, segment_ids=documents,
      **op_kwargs,
    )  # fmt: skip
    return out, leaving[None]

  seq3, seq4 = (mesh_lib.seq_spec(n, axis, batch_axes) for n in (3, 4))
  batch_names = tuple(batch_axes) if isinstance(batch_axes, list | tuple) else batch_axes
  out, finals = jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(
      seq4,
      seq4,
      seq4,
      seq3,
      seq3,
      mesh_lib.batch_spec(4, batch_axes),
      mesh_lib.seq_spec(2, axis, batch_axes),
    ),  # fmt: skip
    out_specs=(seq4, PartitionSpec(axis, batch_names)),
    check_vma=False,
  )(q, k, v, beta, log_decay, initial_state, ids)
  return out, finals[-1]


def delta_rule_attention(
  op,
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  beta: jax.Array,
  log_decay: jax.Array | None,
  initial_state: jax.Array | None,
  segment_ids: jax.Array | None,
  *,
  op_kwargs: tuple[tuple[str, object], ...],
  mesh: jax.sharding.Mesh,
  axis: str,
  batch_axes: mesh_lib.BatchAxes = None,
) -> tuple[jax.Array, jax.Array]:
  """LASP-2 of global `q [b, T, h, dk]`, `k`, `v [b, T, hk, dk|dv]`, `beta`, `log_decay
  [b, T, h]`, `segment_ids [b, T]` sharded over `axis`.

  Returns (out `[b, T, h, dv]`, float32 final state `[b, h, dk, dv]`), equal to
  `op(q, k, v, beta, log_decay=..., initial_state=..., segment_ids=...,
  return_final_state=True, **op_kwargs)` on one device.
  """
  parts = mesh_lib.axis_size(mesh, axis)

  def combine(transition, update, initial_state, ids):
    transitions, updates = (jax.lax.all_gather(x, axis) for x in (transition, update))
    keeps = jnp.ones((parts, q.shape[0]), bool)
    if ids is not None:
      ends = jax.lax.all_gather(jnp.stack([ids[:, 0], ids[:, -1]], axis=-1), axis)  # [P, b, 2]
      # keeps[j]: the state entering shard j reaches its first token.
      keeps = keeps.at[1:].set(ends[1:, :, 0] == ends[:-1, :, 1])
    device = jax.lax.axis_index(axis)
    state, entering = initial_state, None
    for j in range(parts):
      state = state * keeps[j][:, None, None, None]
      entering = jnp.where(device == j, state, entering) if j else state
      state = jnp.einsum("bhfg,bhgv->bhfv", transitions[j], state) + updates[j]
    return entering, state

  return run_sharded(
    combine, op, q, k, v, beta, log_decay, initial_state, segment_ids, op_kwargs=op_kwargs,
    mesh=mesh, axis=axis, batch_axes=batch_axes, strategy="lasp2",
  )  # fmt: skip
