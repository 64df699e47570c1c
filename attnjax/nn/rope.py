"""Rotary position embedding (Su et al. 2021, "RoFormer", arXiv 2104.09864).

Pairs of channels `(i, i + d/2)` of every head are rotated by angle `pos * base**(-2i/d)`, so
the dot product of a rotated query and key depends only on their position difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10_000.0) -> jax.Array:
  """Rotates `x [batch, seq, heads, head_dim]` by `positions` (int `[batch, seq]` or `[seq]`).

  head_dim must be even. Computed in float32, returned in x's dtype.
  """
  if x.ndim != 4:
    raise ValueError(f"x must be [batch, seq, heads, head_dim], got shape {x.shape}")
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"rope needs an even head_dim, got x shape {x.shape}")
  positions = jnp.asarray(positions)
  if positions.shape not in ((x.shape[1],), x.shape[:2]):
    raise ValueError(
      f"positions must be [seq] = ({x.shape[1]},) or [batch, seq] = {x.shape[:2]}, "
      f"got {positions.shape}"
    )
  inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [(batch,) seq, head_dim/2]
  angles = jnp.broadcast_to(angles, (*x.shape[:2], head_dim // 2))[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
