"""Mesh helpers of the sequence-parallel strategies: specs, length checks, zigzag layout.

Every strategy runs under `jax.shard_map` with the sequence dimension (dim 1 of
`[batch, seq, ...]`) split over one mesh axis, and the batch dimension optionally split over
other axes (data / fsdp). Inside the map each device holds a contiguous slice of the sequence.

The zigzag layout (the load balancing of Llama 3's context parallelism, Grattafiori et al.
2024, and of open ring-attention implementations) cuts the sequence into `2P` chunks and gives
device `d` the chunks `d` and `2P - 1 - d`, so under a causal mask every device has the same
amount of work. `to_zigzag` / `from_zigzag` move between the contiguous and the zigzag layout
with two collective permutes of half a shard each.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

BatchAxes = str | Sequence[str] | None


def axis_size(mesh: jax.sharding.Mesh, axis: str) -> int:
  """Number of devices along `axis` of `mesh`; a `ValueError` lists the mesh axes otherwise."""
  if axis not in mesh.shape:
    raise ValueError(f"mesh has no axis {axis!r}; its axes are {dict(mesh.shape)}")
  return mesh.shape[axis]


def seq_spec(ndim: int, axis: str, batch_axes: BatchAxes = None) -> PartitionSpec:
  """Spec of a `[batch, seq, ...]` array of rank `ndim`: seq on `axis`, batch on `batch_axes`."""
  batch = tuple(batch_axes) if isinstance(batch_axes, list | tuple) else batch_axes
  return PartitionSpec(batch, axis, *([None] * (ndim - 2)))


def batch_spec(ndim: int, batch_axes: BatchAxes = None) -> PartitionSpec:
  """Spec of a `[batch, ...]` array replicated over the sequence axis."""
  batch = tuple(batch_axes) if isinstance(batch_axes, list | tuple) else batch_axes
  return PartitionSpec(batch, *([None] * (ndim - 1)))


def check_split(seq_len: int, parts: int, *, strategy: str, zigzag: bool = False) -> int:
  """Length of one shard; raises a `ValueError` when `seq_len` does not split evenly."""
  pieces = 2 * parts if zigzag else parts
  if seq_len % pieces:
    layout = f"2 x {parts} zigzag chunks" if zigzag else f"{parts} devices"
    raise ValueError(
      f"sequence-parallel strategy {strategy!r} needs a sequence length divisible into "
      f"{layout} ({pieces} pieces), got seq_len={seq_len}; pad the sequence to a multiple of "
      f"{pieces} (padding tokens: a padding segment id)"
    )
  return seq_len // parts


def zigzag_chunks(device: int, parts: int) -> tuple[int, int]:
  """The two chunks (of `2 * parts`) device `device` holds in the zigzag layout."""
  return device, 2 * parts - 1 - device


def zigzag_order(seq_len: int, parts: int) -> np.ndarray:
  """Permutation `[seq_len]`: `x[:, zigzag_order(T, P)]` puts a sequence in zigzag order.

  A model can permute its tokens (and their positions, for rotary embeddings) once, then
  call ring attention with `relayout=False` in every layer.
  """
  chunks = np.arange(seq_len).reshape(2 * parts, -1)
  return np.concatenate([chunks[list(zigzag_chunks(d, parts))].reshape(-1) for d in range(parts)])


def _zigzag_owner(chunk: int, parts: int) -> int:
  return chunk if chunk < parts else 2 * parts - 1 - chunk


def _halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  half = x.shape[1] // 2
  return x[:, :half], x[:, half:]


def to_zigzag(x: jax.Array, axis: str, parts: int) -> jax.Array:
  """Inside `shard_map`: contiguous shard `[batch, 2c, ...]` -> zigzag shard (same shape).

  Device r holds chunks 2r (first half) and 2r + 1; chunk x belongs to device x if x < P,
  else 2P - 1 - x. The two chunks a device receives have opposite parity (they sum to
  2P - 1), so one permute moves every even chunk and one every odd chunk.
  """
  if parts == 1:
    return x
  even, odd = _halves(x)
  even_perm = [(r, _zigzag_owner(2 * r, parts)) for r in range(parts)]
  odd_perm = [(r, _zigzag_owner(2 * r + 1, parts)) for r in range(parts)]
  got_even = jax.lax.ppermute(even, axis, even_perm)
  got_odd = jax.lax.ppermute(odd, axis, odd_perm)
  low_is_even = jax.lax.axis_index(axis) % 2 == 0  # chunk d is the even one iff d is even
  low = jnp.where(low_is_even, got_even, got_odd)
  high = jnp.where(low_is_even, got_odd, got_even)
  return jnp.concatenate([low, high], axis=1)


def from_zigzag(x: jax.Array, axis: str, parts: int) -> jax.Array:
  """Inverse of `to_zigzag`: zigzag shard -> contiguous shard."""
  if parts == 1:
    return x
  low, high = _halves(x)
  low_is_even = jax.lax.axis_index(axis) % 2 == 0
  even = jnp.where(low_is_even, low, high)
  odd = jnp.where(low_is_even, high, low)
  even_perm = [(_zigzag_owner(2 * r, parts), r) for r in range(parts)]
  odd_perm = [(_zigzag_owner(2 * r + 1, parts), r) for r in range(parts)]
  got_even = jax.lax.ppermute(even, axis, even_perm)
  got_odd = jax.lax.ppermute(odd, axis, odd_perm)
  return jnp.concatenate([got_even, got_odd], axis=1)
