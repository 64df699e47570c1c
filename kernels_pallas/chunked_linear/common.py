"""Pieces shared by the chunked-linear kernels (`tpu.py`, `gpu.py`): argument checks and GQA
sums."""

from __future__ import annotations

import jax


def check_shapes(
  q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, initial_state: jax.Array
) -> None:
  """Raises ValueError naming the argument whose shape breaks the kernels' contract."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
      f"q, k, v must be [batch, seq, heads, dim], got {q.shape}, {k.shape}, {v.shape}"
    )
  batch, seq, heads, key_dim = q.shape
  kv_heads = k.shape[2]
  if k.shape != (batch, seq, kv_heads, key_dim) or kv_heads == 0 or heads % kv_heads:
    raise ValueError(
      f"k must be [batch={batch}, seq={seq}, kv_heads dividing {heads}, key_dim={key_dim}], "
      f"got {k.shape}"
    )
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(
      f"v must be [batch, seq, kv_heads, value_dim] = {k.shape[:3]} + (dv,), got {v.shape}"
    )
  if log_decay.shape not in ((batch, seq, heads, 1), (batch, seq, heads, key_dim)):
    raise ValueError(
      f"log_decay must be [batch, seq, heads, 1 | key_dim] = {(batch, seq, heads)} + (1 or "
      f"{key_dim},), got {log_decay.shape}"
    )
  state_shape = (batch, heads, key_dim, v.shape[3])
  if initial_state.shape != state_shape:
    raise ValueError(
      f"initial_state must be [batch, heads, key_dim, value_dim] = {state_shape}, "
      f"got {initial_state.shape}"
    )


def sum_groups(x: jax.Array, kv_heads: int) -> jax.Array:
  """`[batch, heads, seq, dim]` per query head -> `[batch, kv_heads, seq, dim]`, summed over each
  kv head's group of query heads (the gradient of a kv head shared by its GQA group)."""
  batch, heads, seq, dim = x.shape
  return x.reshape(batch, kv_heads, heads // kv_heads, seq, dim).sum(axis=2)
