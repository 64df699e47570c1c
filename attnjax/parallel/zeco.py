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

The delta rule's shard map is affine with a matrix, `prefix_{r+1} = M_r prefix_r + D_r`
(`attnjax.parallel.delta_rule`); `M_r` mixes key channels, so its scan slices value_dim.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from attnjax.parallel import delta_rule, linear_state
from attnjax.parallel import mesh as mesh_lib


def _piece_count(size: int, pieces: int) -> int:
  """Largest divisor of `size` that is at most `pieces` (slices must have equal sizes)."""
  return max(n for n in range(1, min(pieces, size) + 1) if size % n == 0)


def all_scan(
  extend: Callable[[jax.Array, jax.Array], jax.Array],
  prefix: jax.Array,
  *,
  axis: str,
  parts: int,
) -> jax.Array:
  """Inside `shard_map`: the state entering device r, in slices `[n, ...]`.

  `prefix` holds, on device 0, the slices of the state entering the sequence (ignored on the
  other devices). `extend(piece, i)` maps slice i of the state entering this device to slice
  i of the state leaving it (`i` traced); slices must be independent under it. At stage t
  device r sends slice t - r to device r + 1.
  """
  n = prefix.shape[0]
  device = jax.lax.axis_index(axis)
  for stage in range(parts + n - 2):
    senders = [r for r in range(parts - 1) if 0 <= stage - r < n]
    sent = jnp.clip(stage - device, 0, n - 1)
    outgoing = extend(jax.lax.dynamic_index_in_dim(prefix, sent, 0, keepdims=False), sent)
    incoming = jax.lax.ppermute(outgoing, axis, [(r, r + 1) for r in senders])
    received = stage - (device - 1)
    valid = (device >= 1) & (received >= 0) & (received < n)
    slot = jnp.clip(received, 0, n - 1)
    own = jax.lax.dynamic_index_in_dim(prefix, slot, 0, keepdims=False)
    prefix = jax.lax.dynamic_update_index_in_dim(prefix, jnp.where(valid, incoming, own), slot, 0)
  return prefix


def _slices(x: jax.Array, dim: int, n: int) -> jax.Array:
  """`x` cut into `n` equal slices along `dim`, stacked first; a size-1 `dim` gives one."""
  if x.shape[dim] == 1:
    return x[None]
  x = x.reshape(*x.shape[:dim], n, x.shape[dim] // n, *x.shape[dim + 1 :])
  return jnp.moveaxis(x, dim, 0)


def _joined(slices: jax.Array, dim: int) -> jax.Array:
  """Inverse of `_slices` for `n > 1` or a full-size slice."""
  x = jnp.moveaxis(slices, 0, dim)
  return x.reshape(*x.shape[:dim], -1, *x.shape[dim + 2 :])


def _piece(slices: jax.Array, i: jax.Array) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(slices, jnp.minimum(i, slices.shape[0] - 1), 0, False)


def linear_prefix(
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
  `[b | 1, h | 1, 1 | f, 1]`; `initial_state` enters device 0. Slices cut key_dim, along
  which a per-channel decay acts elementwise.
  """
  n = _piece_count(state.shape[2], pieces)
  state_s, decay_s = _slices(state, 2, n), _slices(decay, 2, n)
  prefix = jnp.zeros_like(state_s)
  if initial_state is not None:
    prefix = _slices(initial_state.astype(jnp.float32), 2, n)

  def extend(piece, i):
    return jnp.exp(_piece(decay_s, i)) * piece + _piece(state_s, i)

  prefix = _joined(all_scan(extend, prefix, axis=axis, parts=parts), 2)
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
    prefix, leaving = linear_prefix(
      state, decay, initial_state, axis=axis, parts=parts, pieces=pieces
    )
    out = op(q, k, v, log_decay=log_decay, initial_state=prefix, **op_kwargs)
    return out, leaving[None]

  return linear_state.run_sharded(
    per_device, mesh, axis, batch_axes, q, k, v, log_decay, initial_state
  )


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
  pieces: int = 4,
) -> tuple[jax.Array, jax.Array]:
  """ZeCO of the delta rule (`attnjax.ops.delta`), arguments and result as LASP-2's
  `attnjax.parallel.delta_rule.delta_rule_attention`.

  A shard maps the state entering it to the state it ends in by `S_out = M S_in + D`
  (`chunk.sequence_summary`), `M` acting on key_dim, so the scan cuts the state into `pieces`
  slices along value_dim, each extended independently. With packed documents a device whose
  first token starts a document (its id differs from the previous device's last, one int per
  sequence received) drops the state entering it.
  """
  if not isinstance(pieces, int) or pieces < 1:
    raise ValueError(f"pieces must be a positive int, got pieces={pieces!r}")
  parts = mesh_lib.axis_size(mesh, axis)

  def combine(transition, update, initial_state, ids):
    if ids is not None:
      previous_last = jax.lax.ppermute(ids[:, -1], axis, [(r, r + 1) for r in range(parts - 1)])
      keep = (jax.lax.axis_index(axis) == 0) | (ids[:, 0] == previous_last)
      transition = transition * keep[:, None, None, None]
    n = _piece_count(update.shape[3], pieces)
    update_s = _slices(update, 3, n)

    def extend(piece, i):
      return jnp.einsum("bhfg,bhgv->bhfv", transition, piece) + _piece(update_s, i)

    prefix = _joined(all_scan(extend, _slices(initial_state, 3, n), axis=axis, parts=parts), 3)
    if ids is not None:
      prefix = prefix * keep[:, None, None, None]
    return prefix, jnp.einsum("bhfg,bhgv->bhfv", transition, prefix) + update

  return delta_rule.run_sharded(
    combine, op, q, k, v, beta, log_decay, initial_state, segment_ids, op_kwargs=op_kwargs,
    mesh=mesh, axis=axis, batch_axes=batch_axes, strategy="zeco",
  )  # fmt: skip
