"""Token-by-token linear attention recurrence in float32: the oracle of every other form.

    S_t = diag(exp(log_decay_t)) S_{t-1} + k_t^T v_t        S: [key_dim, value_dim]
    o_t = q_t S_t            (causal)       o_t = q_t S_T    (bidirectional)

`q` and `k` arrive as `phi(scale * q)` and `phi(k)` from `attnjax.ops.linear_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def recurrent_step(
  state: jax.Array, q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, log_decay_t: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """One token: `state [b, h, f, dv]`, `q_t`, `k_t [b, h, f]`, `v_t [b, h, dv]`,
  `log_decay_t [b, h, 1 | f]` -> (`o_t [b, h, dv]`, new state), all float32."""
  state = jnp.exp(log_decay_t)[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
  return jnp.einsum("bhf,bhfv->bhv", q_t, state), state


def linear_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  log_decay: jax.Array,
  initial_state: jax.Array,
  causal: bool,
  chunk_size: int,
) -> tuple[jax.Array, jax.Array]:
  """`q [b, t, h, f]`, `k [b, t, hk, f]`, `v [b, t, hk, dv]`, `log_decay [b, t, h, 1 | f]`,
  `initial_state [b, h, f, dv]` -> (`out [b, t, h, dv]`, `final_state [b, h, f, dv]`), float32.

  `chunk_size` is accepted for a uniform signature and ignored.
  """
  del chunk_size
  groups = q.shape[2] // k.shape[2]
  q = q.astype(jnp.float32)
  k = jnp.repeat(k.astype(jnp.float32), groups, axis=2)
  v = jnp.repeat(v.astype(jnp.float32), groups, axis=2)

  def step(state, xs):
    out_t, state = recurrent_step(state, *xs)
    return state, out_t

  time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, log_decay)]
  final_state, out = jax.lax.scan(step, initial_state.astype(jnp.float32), time_major)
  if not causal:
    return jnp.einsum("bthf,bhfv->bthv", q, final_state), final_state
  return jnp.moveaxis(out, 0, 1), final_state
