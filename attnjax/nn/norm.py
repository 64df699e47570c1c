"""RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.params import param


def rms_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """`x / rms(x)` over the last axis, computed in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """`rms_normalize(x) * scale` over the last axis (`features`, logical axis `axis_name`)."""

  def __init__(self, features: int, *, axis_name: str = "embed", eps: float = 1e-6, rngs):
    self.eps = eps
    self.scale = param(rngs, nnx.initializers.ones, (features,), (axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x [..., features]` -> same shape and dtype."""
    return rms_normalize(x, self.eps) * self.scale[...].astype(x.dtype)
