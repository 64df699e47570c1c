"""LASP-2: sequence-parallel linear attention with one all-gather of per-device states.

LASP-2 (Sun et al. 2025, "LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its
Hybrid"): each device computes the state its shard ends in from a zero state and the shard's
total decay, all-gathers these `[b, h, key_dim, value_dim]` states (a size independent of the
sequence length), combines the prefix it needs (`linear_state.prefix_state`) and runs its shard
from that prefix. The backward pass is JAX's: the all-gather transposes to a reduce-scatter of
state gradients, again independent of the sequence length.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from attnjax.parallel import linear_state
from attnjax.parallel import mesh as mesh_lib


def linear_attention(
  op: Callable,
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  log_decay: jax.Array | None,
  initial_state: jax.Array | None,
  *,
  op_kwargs: tuple[tuple[str, object], ...],
  mesh: jax.sharding.Mesh,
  axis: str,
  batch_axes: mesh_lib.BatchAxes = None,
) -> tuple[jax.Array, jax.Array]:
  """LASP-2 of global `q [b, T, h, d]`, `k`, `v [b, T, hk, d|dv]` sharded over `axis`.

  Returns (out `[b, T, h, dv]`, float32 final state `[b, h, f, dv]`), equal to
  `op(q, k, v, log_decay=..., initial_state=..., return_final_state=True, **op_kwargs)` on
  one device (`op_kwargs`: the op's other keywords as sorted items).
  """
  op_kwargs = dict(op_kwargs)
  parts = mesh_lib.axis_size(mesh, axis)
  local_len = mesh_lib.check_split(q.shape[1], parts, strategy="lasp2")

  def per_device(q, k, v, log_decay, initial_state):
    state = linear_state.local_state(op, q, k, v, log_decay, op_kwargs)
    decay = linear_state.chunk_log_decay(log_decay, local_len)
    states = jax.lax.all_gather(state, axis)
    decays = jax.lax.all_gather(decay, axis)
    device = jax.lax.axis_index(axis)
    prefix = linear_state.prefix_state(states, decays, device, initial_state)
    out = op(q, k, v, log_decay=log_decay, initial_state=prefix, **op_kwargs)
    final = linear_state.prefix_state(states, decays, parts, initial_state)
    return out, final[None]

  return linear_state.run_sharded(
    per_device, mesh, axis, batch_axes, q, k, v, log_decay, initial_state
  )
