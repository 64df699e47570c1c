"""LightNet's additive linear recurrence (Qin et al. 2024, "You Only Scan Once: Efficient
Multi-dimension Sequential Modeling with LightNet", arXiv 2405.21022).

The additive recurrence `S_t = S_{t-1} + exp(k_t)^T v_t`, read as `o_t = q_t S_t / z_t` with
`z_t = z_{t-1} + exp(k_t)` per key channel, equals a multiplicative (GLA-style) recurrence on
`S_t / z_t` with data-dependent vector decay `a_t = z_{t-1} / z_t` and keys
`exp(k_t) / z_t`. Both are computed in log space from `log z_t = logcumsumexp(k)`, so no
`exp(k)` can overflow.

State: `[batch, heads, key_dim, value_dim + 1]` float32 (query heads, as `linear_attention`):
the normalized state `S_t / z_t` in the first `value_dim` columns and `log z_t` in the last.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.ops.linear import api
from attnjax.ops.qkv import check_qkv


def lightnet_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale: float | None = None,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  chunk_size: int = 64,
  impl: str = "auto",
):
  """`q [b, t, h, d]`, `k [b, t, hk, d]`, `v [b, t, hk, dv]` -> `[b, t, h, dv]` (causal).

  `initial_state` / the final state (with `return_final_state`): float32
  `[b, h, d, dv + 1]` as in the module docstring; None starts from `z_0 = 0`.
  """
  shape = check_qkv(q, k, v, same_length=True)
  state_shape = (shape.batch, shape.heads, shape.head_dim, v.shape[-1] + 1)
  log_z = jax.lax.cumlogsumexp(k.astype(jnp.float32), axis=1)  # [b, t, hk, d]
  state = None
  if initial_state is None:
    # z_{-1} = 0 means S_{-1} = 0: the first token's decay multiplies zeros, so any finite
    # value works; 0 keeps the chunked path's exponents finite.
    previous = jnp.concatenate([log_z[:, :1], log_z[:, :-1]], axis=1)
  else:
    if initial_state.shape != state_shape:
      raise ValueError(
        f"initial_state must be [batch, heads, key_dim, value_dim + 1] = {state_shape} "
        f"(the last column holds log z), got shape {initial_state.shape}"
      )
    state = initial_state[..., :-1]
    # Every query head of a GQA group carries its kv head's log z: read the group's first.
    log_z0 = initial_state[:, :: shape.groups, :, -1][:, None]  # [b, 1, hk, d]
    log_z = jnp.logaddexp(log_z0, log_z)
    previous = jnp.concatenate([log_z0, log_z[:, :-1]], axis=1)
  keys = jnp.exp(k.astype(jnp.float32) - log_z).astype(k.dtype)
  log_decay = jnp.repeat(previous - log_z, shape.groups, axis=2)
  out, final = api.linear_attention(
    q,
    keys,
    v,
    log_decay=log_decay,
    scale=scale,
    initial_state=state,
    return_final_state=True,
    chunk_size=chunk_size,
    impl=impl,
  )
  if not return_final_state:
    return out
  final_log_z = jnp.repeat(log_z[:, -1], shape.groups, axis=1)  # [b, h, d]
  return out, jnp.concatenate([final, final_log_z[..., None]], axis=-1)
