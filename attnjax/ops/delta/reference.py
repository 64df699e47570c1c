"""Token-by-token delta rule in float32: the oracle of every other form.

    S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T        S: [key_dim, value_dim]
    o_t = scale * S_t^T q_t

`log_decay` holds `log a_t` (zeros: DeltaNet); `carry` is False where a document starts, and
there the state entering the token is zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def delta_step(state, q_t, k_t, v_t, beta_t, log_decay_t, scale: float):
  """One token: `state [b, h, dk, dv]`, `q_t`, `k_t [b, h, dk]`, `v_t [b, h, dv]`, `beta_t`,
  `log_decay_t [b, h]` -> (`o_t [b, h, dv]`, new state), all float32."""
  decayed = jnp.exp(log_decay_t)[..., None, None] * state
  error = v_t - jnp.einsum("bhk,bhkv->bhv", k_t, decayed)
  state = decayed + (beta_t[..., None] * k_t)[..., :, None] * error[..., None, :]
  return scale * jnp.einsum("bhk,bhkv->bhv", q_t, state), state


def delta_rule_attention(q, k, v, beta, *, log_decay, carry, initial_state, scale, chunk_size):
  """`q [b, t, h, dk]`, `k [b, t, hk, dk]`, `v [b, t, hk, dv]`, `beta`, `log_decay [b, t, h]`,
  `carry [b, t]` bool (None: no document starts), `initial_state [b, h, dk, dv]` ->
  (`out [b, t, h, dv]`, `final_state [b, h, dk, dv]`), float32. `chunk_size` is accepted for
  a uniform signature and ignored."""
  del chunk_size
  groups = q.shape[2] // k.shape[2]
  if carry is None:
    carry = jnp.ones(q.shape[:2], bool)
  q = q.astype(jnp.float32)
  k, v = (jnp.repeat(x.astype(jnp.float32), groups, axis=2) for x in (k, v))

  def step(state, xs):
    q_t, k_t, v_t, beta_t, log_decay_t, carry_t = xs
    state = jnp.where(carry_t[:, None, None, None], state, 0.0)
    out_t, state = delta_step(state, q_t, k_t, v_t, beta_t, log_decay_t, scale)
    return state, out_t

  time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, log_decay, carry)]
  final_state, out = jax.lax.scan(step, initial_state.astype(jnp.float32), time_major)
  return jnp.moveaxis(out, 0, 1), final_state
