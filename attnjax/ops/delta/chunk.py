"""Chunked delta rule in pure JAX (the WY / UT form of Yang et al. 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length", arXiv 2406.06484, Sec. 3, with the
gate of Gated DeltaNet, arXiv 2412.06464, Sec. 3.3).

Inside a chunk of `C` tokens, with `G_i` the cumulative log decay from the chunk's start to
token i (inclusive) and `S` the state entering the chunk, unrolling the recurrence gives

    S_i = exp(G_i) S + sum_{j <= i} exp(G_i - G_j) k_j w_j^T
    w_i = beta_i (v_i - exp(G_i) S^T k_i - sum_{j < i} exp(G_i - G_j) (k_i . k_j) w_j)

so `(I + A) W = beta V - beta exp(G) K S` with `A_ij = beta_i exp(G_i - G_j) k_i . k_j` for
j < i: one unit lower-triangular solve per chunk gives `W = U - W_k S` (the UT transform), and

    O  = scale (P U + (Q exp(G) - P W_k) S),       P_ij = exp(G_i - G_j) q_i . k_j, j <= i
    S' = (exp(G_C) I - K_e^T W_k) S + K_e^T U,     K_e = K exp(G_C - G)

Everything but the last line is computed for all chunks at once; the scan over chunks carries
only the `[key_dim, value_dim]` state through each chunk's `[key_dim, key_dim]` transition.
Every exponent is a non-positive difference inside one chunk. A document start (`carry`
False) cuts every term that reaches across it: pairs of tokens of different documents and the
entering state for the tokens after the start. Same signature and function as
`reference.delta_rule_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def delta_rule_attention(q, k, v, beta, *, log_decay, carry, initial_state, scale, chunk_size):
  """`q [b, t, h, dk]`, `k [b, t, hk, dk]`, `v [b, t, hk, dv]`, `beta`, `log_decay [b, t, h]`,
  `carry [b, t]` bool, `initial_state [b, h, dk, dv]` -> (`out [b, t, h, dv]`,
  `final_state [b, h, dk, dv]`), float32."""
  batch, seq, heads, key_dim = q.shape
  groups = heads // k.shape[2]
  chunk = min(chunk_size, seq)
  num_chunks = -(-seq // chunk)
  padded = num_chunks * chunk
  # Zero-padded tokens (beta = 0, no decay) leave the state as it is.
  pad = [(0, 0), (0, padded - seq)]

  def to_chunks(x):  # [b, t, h, ...] -> [b, h, n, C, ...], float32, zero-padded
    x = jnp.pad(x.astype(jnp.float32), pad + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(batch, num_chunks, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 3, 1)

  q_c = to_chunks(q)
  k_c = to_chunks(jnp.repeat(k, groups, axis=2))
  v_c = to_chunks(jnp.repeat(v, groups, axis=2))
  beta_c = to_chunks(beta)[..., None]  # [b, h, n, C, 1]
  g = jnp.cumsum(to_chunks(log_decay), axis=3)  # G: [b, h, n, C]

  # Tokens of one document share a run id; the entering state belongs to run 0.
  run = jnp.pad(jnp.cumsum(~carry, axis=1), pad, mode="edge").reshape(batch, num_chunks, chunk)
  run_before = jnp.concatenate([jnp.zeros_like(run[:, :1, -1]), run[:, :-1, -1]], axis=1)
  same = (run[..., :, None] == run[..., None, :])[:, None]  # [b, 1, n, C, C]
  from_state = (run == run_before[..., None])[:, None]  # [b, 1, n, C]

  lower = jnp.tril(jnp.ones((chunk, chunk), bool))
  strict = lower & ~jnp.eye(chunk, dtype=bool)

  def decays(mask):  # exp(G_i - G_j) where mask & same, else 0: [b, h, n, C, C]
    diff = g[..., :, None] - g[..., None, :]
    return jnp.exp(jnp.where(mask & same, diff, -jnp.inf))

  kk = jnp.einsum("bhnif,bhnjf->bhnij", k_c, k_c)
  a = beta_c * decays(strict) * kk
  unit_lower = a + jnp.eye(chunk)
  state_decay = jnp.where(from_state, jnp.exp(g), 0.0)[..., None]  # [b, h, n, C, 1]

  def solve(rhs):
    return jax.scipy.linalg.solve_triangular(unit_lower, rhs, lower=True, unit_diagonal=True)

  u = solve(beta_c * v_c)  # [b, h, n, C, dv]
  w_k = solve(beta_c * state_decay * k_c)  # [b, h, n, C, dk]
  p = decays(lower) * jnp.einsum("bhnif,bhnjf->bhnij", q_c, k_c)
  query_state = q_c * state_decay - jnp.einsum("bhnij,bhnjf->bhnif", p, w_k)

  to_end = jnp.exp(g[..., -1:] - g) * same[..., -1, :]  # [b, h, n, C]
  k_end = k_c * to_end[..., None]
  transition = state_decay[..., -1, :, None] * jnp.eye(key_dim) - jnp.einsum(
    "bhncf,bhncg->bhnfg", k_end, w_k
  )
  update = jnp.einsum("bhncf,bhncv->bhnfv", k_end, u)

  def carry_state(state, xs):
    step_transition, step_update = xs
    return jnp.einsum("bhfg,bhgv->bhfv", step_transition, state) + step_update, state

  final_state, states_before = jax.lax.scan(
    carry_state,
    initial_state.astype(jnp.float32),
    (jnp.moveaxis(transition, 2, 0), jnp.moveaxis(update, 2, 0)),
  )
  states_before = jnp.moveaxis(states_before, 0, 2)  # [b, h, n, dk, dv]
  out = jnp.einsum("bhnij,bhnjv->bhniv", p, u)
  out = out + jnp.einsum("bhncf,bhnfv->bhncv", query_state, states_before)
  out = scale * jnp.moveaxis(out, 1, 3).reshape(batch, padded, heads, -1)
  return out[:, :seq], final_state
