"""SwiGLU feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.params import fan_in_init, param


class SwiGLU(nnx.Module):
  """`down(silu(gate(x)) * up(x))`: `[..., embed] -> [..., embed]` through `mlp_dim` units."""

  def __init__(self, embed_dim: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.dtype = dtype
    self.gate = param(rngs, fan_in_init(), (embed_dim, mlp_dim), ("embed", "mlp"))
    self.up = param(rngs, fan_in_init(), (embed_dim, mlp_dim), ("embed", "mlp"))
    self.down = param(rngs, fan_in_init(), (mlp_dim, embed_dim), ("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    hidden = jax.nn.silu(x @ self.gate[...].astype(self.dtype)) * (
      x @ self.up[...].astype(self.dtype)
    )
    return hidden @ self.down[...].astype(self.dtype)
