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

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ChunkTerms(NamedTuple):
  """Per-chunk pieces of the chunked delta rule (`[b, h, n, ...]`, float32). With `S` the state
  entering a chunk: `O = P U + Q_s S` and `S' = e S + K_e^T (U - W S)`."""

  p: jax.Array  # [C, C] decayed causal scores
  u: jax.Array  # [C, dv] values written from a zero state
  w: jax.Array  # [C, dk] W_k: how the entering state changes what each token writes
  query_state: jax.Array  # [C, dk] Q_s: how each output reads the entering state
  k_end: jax.Array  # [C, dk] K_e: keys decayed to the chunk's end
  end_decay: jax.Array  # [] e: the entering state's decay to the chunk's end

  def transition(self) -> jax.Array:
    """`[b, h, n, dk, dk]`: how each chunk maps its entering state to its end state."""
    eye = jnp.eye(self.w.shape[-1])
    return self.end_decay[..., None, None] * eye - jnp.einsum(
      "bhncf,bhncg->bhnfg", self.k_end, self.w
    )

  def update(self) -> jax.Array:
    """`[b, h, n, dk, dv]`: each chunk's end state from a zero entering state."""
    return jnp.einsum("bhncf,bhncv->bhnfv", self.k_end, self.u)


def delta_rule_attention(q, k, v, beta, *, log_decay, carry, initial_state, scale, chunk_size):
  """`q [b, t, h, dk]`, `k [b, t, hk, dk]`, `v [b, t, hk, dv]`, `beta`, `log_decay [b, t, h]`,
  `carry [b, t]` bool (None: no document starts), `initial_state [b, h, dk, dv]` ->
  (`out [b, t, h, dv]`, `final_state [b, h, dk, dv]`), float32."""
  batch, seq, heads, _ = q.shape
  terms = chunk_terms(q, k, v, beta, log_decay, carry, chunk_size)

  def carry_state(state, xs):
    step_transition, step_update = xs
    return jnp.einsum("bhfg,bhgv->bhfv", step_transition, state) + step_update, state

  final_state, states_before = jax.lax.scan(
    carry_state,
    initial_state.astype(jnp.float32),
    (jnp.moveaxis(terms.transition(), 2, 0), jnp.moveaxis(terms.update(), 2, 0)),
  )
  states_before = jnp.moveaxis(states_before, 0, 2)  # [b, h, n, dk, dv]
  out = jnp.einsum("bhnij,bhnjv->bhniv", terms.p, terms.u)
  out = out + jnp.einsum("bhncf,bhnfv->bhncv", terms.query_state, states_before)
  out = scale * jnp.moveaxis(out, 1, 3).reshape(batch, -1, heads, out.shape[-1])
  return out[:, :seq], final_state


def sequence_summary(q, k, v, beta, *, log_decay, carry, chunk_size):
  """The whole sequence as one affine map of the state entering it: (`transition [b, h, dk,
  dk]`, `update [b, h, dk, dv]`) with `final = transition @ initial + update` (what LASP-2
  passes between devices for the delta rule). Arguments as `delta_rule_attention`."""
  terms = chunk_terms(q, k, v, beta, log_decay, carry, chunk_size)
  transitions, updates = terms.transition(), terms.update()

  def compose(summary, xs):
    transition, update = summary
    step_transition, step_update = xs
    transition = jnp.einsum("bhfg,bhgk->bhfk", step_transition, transition)
    update = jnp.einsum("bhfg,bhgv->bhfv", step_transition, update) + step_update
    return (transition, update), None

  batch, heads, _, key_dim, value_dim = updates.shape
  start = (
    jnp.broadcast_to(jnp.eye(key_dim), (batch, heads, key_dim, key_dim)),
    jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32),
  )
  xs = (jnp.moveaxis(transitions, 2, 0), jnp.moveaxis(updates, 2, 0))
  summary, _ = jax.lax.scan(compose, start, xs)
  return summary


def chunk_terms(q, k, v, beta, log_decay, carry, chunk_size) -> ChunkTerms:
  """Everything of the chunked form that does not depend on the entering state (arguments as
  `delta_rule_attention`; the sequence is zero-padded to whole chunks of `min(chunk_size,
  seq)` tokens)."""
  batch, seq, heads, _ = q.shape
  groups = heads // k.shape[2]
  chunk = min(chunk_size, seq)
  num_chunks = -(-seq // chunk)
  # Zero-padded tokens (beta = 0, no decay) leave the state as it is.
  pad = [(0, 0), (0, num_chunks * chunk - seq)]

  def to_chunks(x):  # [b, t, h, ...] -> [b, h, n, C, ...], float32, zero-padded
    x = jnp.pad(x.astype(jnp.float32), pad + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(batch, num_chunks, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 3, 1)

  q_c = to_chunks(q)
  k_c = to_chunks(jnp.repeat(k, groups, axis=2))
  v_c = to_chunks(jnp.repeat(v, groups, axis=2))
  beta_c = to_chunks(beta)[..., None]  # [b, h, n, C, 1]
  g = jnp.cumsum(to_chunks(log_decay), axis=3)  # G: [b, h, n, C]

  same, from_state = _document_masks(carry, batch, num_chunks, chunk, pad)
  lower = jnp.tril(jnp.ones((chunk, chunk), bool))
  strict = lower & ~jnp.eye(chunk, dtype=bool)

  def decays(mask):  # exp(G_i - G_j) where mask & same, else 0: [b, h, n, C, C]
    diff = g[..., :, None] - g[..., None, :]
    return jnp.exp(jnp.where(mask & same, diff, -jnp.inf))

  kk = jnp.einsum("bhnif,bhnjf->bhnij", k_c, k_c)
  a = beta_c * decays(strict) * kk
  state_decay = jnp.where(from_state, jnp.exp(g), 0.0)[..., None]  # [b, h, n, C, 1]
  inverse = unit_lower_inverse(a)  # (I + A)^-1: [b, h, n, C, C]
  u = inverse @ (beta_c * v_c)  # [b, h, n, C, dv]
  w_k = inverse @ (beta_c * state_decay * k_c)  # [b, h, n, C, dk]
  p = decays(lower) * jnp.einsum("bhnif,bhnjf->bhnij", q_c, k_c)
  query_state = q_c * state_decay - jnp.einsum("bhnij,bhnjf->bhnif", p, w_k)

  to_end = jnp.exp(g[..., -1:] - g)  # [b, h, n, C]
  if carry is not None:
    to_end = to_end * same[..., -1, :]
  return ChunkTerms(p, u, w_k, query_state, k_c * to_end[..., None], state_decay[..., -1, 0])


def _document_masks(carry, batch: int, num_chunks: int, chunk: int, pad):
  """(`same [b, 1, n, C, C]`: tokens i, j of a chunk are in one document; `from_state
  [b, 1, n, C]`: token i is in the document of the state entering its chunk), or (True, True)
  for `carry=None`. Tokens of one document share a run id; the initial state's is 0."""
  if carry is None:
    return True, True
  run = jnp.pad(jnp.cumsum(~carry, axis=1), pad, mode="edge").reshape(batch, num_chunks, chunk)
  run_before = jnp.concatenate([jnp.zeros_like(run[:, :1, -1]), run[:, :-1, -1]], axis=1)
  same = (run[..., :, None] == run[..., None, :])[:, None]
  return same, (run == run_before[..., None])[:, None]


def unit_lower_inverse(a: jax.Array) -> jax.Array:
  """`(I + a)^-1` for strictly lower triangular `a [..., C, C]` (its other entries are not read).

  Block inversion from the diagonal out, all chunks at once: with the inverses `T11`, `T22` of
  two neighbouring diagonal blocks, the block of twice the size has `T21 = -T22 a21 T11`. Only
  batched matmuls (`log2 C` rounds), where row-by-row substitution would make `C` passes over
  the right-hand side (and XLA's batched `solve_triangular` is about 100x slower on CPU).
  """
  size = a.shape[-1]
  padded = 1 << max(size - 1, 0).bit_length()
  pad = [(0, 0)] * (a.ndim - 2) + [(0, padded - size)] * 2
  a = jnp.tril(jnp.pad(a, pad), -1)
  batch = a.shape[:-2]
  inverse = jnp.ones((*batch, padded, 1, 1), a.dtype)  # the 1 x 1 diagonal blocks
  block = 1
  while block < padded:
    count = padded // (2 * block)
    pairs = a.reshape(*batch, count, 2 * block, count, 2 * block)
    pairs = jnp.moveaxis(jnp.diagonal(pairs, axis1=-4, axis2=-2), -1, -3)  # [.., count, 2b, 2b]
    halves = inverse.reshape(*batch, count, 2, block, block)
    t11, t22 = halves[..., 0, :, :], halves[..., 1, :, :]
    t21 = -t22 @ pairs[..., block:, :block] @ t11
    top = jnp.concatenate([t11, jnp.zeros_like(t11)], axis=-1)
    inverse = jnp.concatenate([top, jnp.concatenate([t21, t22], axis=-1)], axis=-2)
    block *= 2
  return inverse[..., 0, :size, :size]
