"""Chunk states of linear attention, the pieces LASP-2 and ZeCO pass between devices.

With the sequence split into P contiguous shards, shard j alone (zero initial state) ends in
the state `S_j` and decays any state entering it by `exp(L_j)`, `L_j` its summed log decay
(`[b, h, 1 | key_dim, 1]`). The state entering shard r is then

    prefix_r = exp(E_r) S_init + sum_{j < r} exp(E_r - I_j) S_j,

with `I_j = L_0 + ... + L_j` and `E_r = I_{r-1}` (so every exponent is a non-positive sum of
log decays), and running the op on shard r from `prefix_r` gives its exact outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from attnjax.parallel import mesh as mesh_lib


def local_state(op: Callable, q, k, v, log_decay, op_kwargs: dict) -> jax.Array:
  """Float32 `[b, h, key_dim, value_dim]` state a shard ends in from a zero state.

  The op's outputs are unused, so XLA removes their computation.
  """
  _, state = op(q, k, v, log_decay=log_decay, return_final_state=True, **op_kwargs)
  return state


def chunk_log_decay(log_decay: jax.Array | None, seq_len: int) -> jax.Array:
  """Summed log decay of a shard of `seq_len` tokens: float32 `[b | 1, h | 1, 1 | f, 1]`.

  `log_decay` is the op's argument for that shard: None, `[h]`, `[b, t, h]` or `[b, t, h, f]`.
  """
  if log_decay is None:
    return jnp.zeros((1, 1, 1, 1), jnp.float32)
  log_decay = jnp.asarray(log_decay, jnp.float32)
  if log_decay.ndim == 1:
    return (log_decay * seq_len)[None, :, None, None]
  if log_decay.ndim == 3:
    return log_decay.sum(1)[..., None, None]
  return log_decay.sum(1)[..., None]


def prefix_state(
  states: jax.Array, decays: jax.Array, upto, initial_state: jax.Array | None
) -> jax.Array:
  """`prefix_upto` from all shards' `states [P, b, h, f, dv]` and `decays [P, ...]`.

  `upto` may be traced (the device index) or P (the final state).
  """
  parts = states.shape[0]
  inclusive = jnp.cumsum(decays, axis=0)
  entering = jnp.concatenate([jnp.zeros_like(inclusive[:1]), inclusive])
  entering = jax.lax.dynamic_index_in_dim(entering, upto, 0, keepdims=False)
  before = (jnp.arange(parts) < upto).reshape(-1, *([1] * (decays.ndim - 1)))
  weights = jnp.exp(jnp.where(before, entering - inclusive, -jnp.inf))
  prefix = jnp.sum(weights * states, axis=0)
  if initial_state is not None:
    prefix = prefix + jnp.exp(entering) * initial_state.astype(jnp.float32)
  return prefix


def run_sharded(per_device, mesh, axis, batch_axes, q, k, v, log_decay, initial_state):
  """Runs `per_device` under `shard_map`; returns (out, final state of the last device)."""
  spec4 = mesh_lib.seq_spec(4, axis, batch_axes)
  if log_decay is None or log_decay.ndim == 1:
    decay_spec = jax.sharding.PartitionSpec()
  else:
    decay_spec = mesh_lib.seq_spec(log_decay.ndim, axis, batch_axes)
  batch = tuple(batch_axes) if isinstance(batch_axes, list | tuple) else batch_axes
  out, finals = jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(spec4, spec4, spec4, decay_spec, mesh_lib.batch_spec(4, batch_axes)),
    out_specs=(spec4, jax.sharding.PartitionSpec(axis, batch)),
    check_vma=False,
  )(q, k, v, log_decay, initial_state)
  return out, finals[-1]
