"""LightNet's additive linear recurrence (Qin et al. 2024, "You Only Scan Once: Efficient
Multi-dimension Sequential Modeling with LightNet", arXiv 2405.21022).

The additive recurrence `S_t = S_{t-1} + exp(k_t)^T v_t`, read as `o_t = q_t S_t / z_t` with
`z_t = z_{t-1} + exp(k_t)` per key channel, equals a multiplicative (GLA-style) recurrence on
`S_t / z_t` with data-dependent vector decay `a_t = z_{t-1} / z_t` and keys
`exp(k_t) / z_t`. Both are computed in log space from `log z_t = logcumsumexp(k)`, so no
`exp(k)` can overflow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.ops.common import check_qkv
from attnjax.ops.linear import api


def lightnet_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale: float | None = None,
  chunk_size: int = 64,
  impl: str = "auto",
) -> jax.Array:
  """`q [b, t, h, d]`, `k [b, t, hk, d]`, `v [b, t, hk, dv]` -> `[b, t, h, dv]` (causal)."""
  shape = check_qkv(q, k, v, same_length=True)
  log_z = jax.lax.cumlogsumexp(k.astype(jnp.float32), axis=1)
  keys = jnp.exp(k.astype(jnp.float32) - log_z).astype(k.dtype)
  log_decay = log_z - jnp.concatenate([log_z[:, :1], log_z[:, :-1]], axis=1)
  # The first token has nothing to decay: log z_0 - log z_0 = 0 above, and z_{-1} = 0 means
  # S_{-1} = 0, so its decay is irrelevant.
  log_decay = jnp.repeat(-log_decay, shape.groups, axis=2)
  return api.linear_attention(
    q, keys, v, log_decay=log_decay, scale=scale, chunk_size=chunk_size, impl=impl
  )
