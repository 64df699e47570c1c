"""ZeCO: sequence-parallel linear attention with the All-Scan collective.

ZeCO (Chou et al. 2025, "ZeCO: Zero Communication Overhead Sequence Parallelism for Linear
Attention"): device r receives exactly the state entering its shard, `prefix_r`, from device
r - 1, extends it by its own shard (`prefix_{r+1} = exp(L_r) prefix_r + S_r`) and passes it
on. The state is cut into `pieces` slices along key_dim and the scan is pipelined: at stage t
device r sends slice t - r, so device r + 1 extends a slice while the next is in flight, and
every device sends one state in total whatever the number of devices (the chain's latency is
P + pieces - 2 slice transfers). Each stage is a collective permute between the devices that
have a slice to send, so idle devices send nothing. The backward pass is JAX's: transposed
permutes run the scan in reverse.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from attnjax.parallel import linear_state
from attnjax.parallel import mesh as mesh_lib


def _piece_count(key_dim: int, pieces: int) -> int:
  """Largest divisor of key_dim that is at most `pieces` (slices must have equal sizes)."""
  return max(n for n in range(1, min(pieces, key_dim) + 1) if key_dim % n == 0)


def all_scan(
  state: jax.Array,
  decay: jax.Array,
  initial_state: jax.Array | None,
  *,
  axis: str,
  parts: int,
  pieces: int,
) -> tuple[jax.Array, jax.Array]:
  """Inside `shard_map`: (`prefix_r`, `prefix_{r+1}`) of device r, each `[b, h, f, dv]`.

  `state` is the device's own shard state `S_r`, `decay` its summed log decay
  `[b | 1, h | 1, 1 | f, 1]`; `initial_state` enters device 0.
  """
  b, h, f, dv = state.shape
  n = _piece_count(f, pieces)

  def sliced(x):  # [b, h, f | 1, ...] -> [b, h, n | 1, f / n | 1, ...]
    return x.reshape(*x.shape[:2], n, f // n, *x.shape[3:]) if x.shape[2] == f else x[:, :, None]

  def piece(x, i):
    return jax.lax.dynamic_index_in_dim(x, i, 2, keepdims=False) if x.shape[2] == n else x[:, :, 0]

  state_s, decay_s = sliced(state), sliced(decay)
  device = jax.lax.axis_index(axis)
  prefix = jnp.zeros_like(state_s)
  if initial_state is not None:
    prefix = jnp.where(device == 0, sliced(initial_state.astype(jnp.float32)), prefix)
  for stage in range(parts + n - 2):
    senders = [r for r in range(parts - 1) if 0 <= stage - r < n]
    sent = jnp.clip(stage - device, 0, n - 1)
    outgoing = jnp.exp(piece(decay_s, sent)) * piece(prefix, sent) + piece(state_s, sent)
    incoming = jax.lax.ppermute(outgoing, axis, [(r, r + 1) for r in senders])
    received = stage - (device - 1)
    valid = (device >= 1) & (received >= 0) & (received < n)
    slot = jnp.clip(received, 0, n - 1)
    kept = jnp.where(valid, incoming, piece(prefix, slot))
    prefix = jax.lax.dynamic_update_index_in_dim(prefix, kept, slot, 2)
  prefix = prefix.reshape(b, h, f, dv)
  return prefix, jnp.exp(decay) * prefix + state


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
  pieces: int = 4,
) -> tuple[jax.Array, jax.Array]:
  """ZeCO of global `q [b, T, h, d]`, `k`, `v [b, T, hk, d|dv]` sharded over `axis`.

  Returns (out `[b, T, h, dv]`, float32 final state `[b, h, f, dv]`), equal to
  `op(q, k, v, log_decay=..., initial_state=..., return_final_state=True, **op_kwargs)` on
  one device (`op_kwargs`: the op's other keywords as sorted items).
  `pieces`: slices of the state pipelined through the scan.
  """
  op_kwargs = dict(op_kwargs)
  parts = mesh_lib.axis_size(mesh, axis)
  local_len = mesh_lib.check_split(q.shape[1], parts, strategy="zeco")
  if not isinstance(pieces, int) or pieces < 1:
    raise ValueError(f"pieces must be a positive int, got pieces={pieces!r}")

  def per_device(q, k, v, log_decay, initial_state):
    state = linear_state.local_state(op, q, k, v, log_decay, op_kwargs)
    decay = linear_state.chunk_log_decay(log_decay, local_len)
    prefix, leaving = all_scan(state, decay, initial_state, axis=axis, parts=parts, pieces=pieces)
    out = op(q, k, v, log_decay=log_decay, initial_state=prefix, **op_kwargs)
    return out, leaving[None]

  return linear_state.run_sharded(
    per_device, mesh, axis, batch_axes, q, k, v, log_decay, initial_state
  )
