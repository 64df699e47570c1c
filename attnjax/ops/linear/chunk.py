"""Chunked linear attention in pure JAX: memory and time linear in the sequence length.

The sequence is cut into chunks of `C` tokens. With `G_i` the cumulative log decay from the
chunk's start to token i (inclusive) and `S` the state entering the chunk:

    o_i  = (q_i * exp(G_i)) S  +  sum_{j <= i in chunk} (q_i * exp(G_i - G_j)) . k_j  v_j
    S'   = exp(G_C) S  +  sum_j (k_j * exp(G_C - G_j))^T v_j

Every exponent is a non-positive difference of cumulative sums inside one chunk, so strong
decay over long sequences underflows harmlessly to zero instead of overflowing. Chunk-local
terms are computed for all chunks at once; only the `[key_dim, value_dim]` state is carried
across chunks by a scan. Same signature and function as `reference.linear_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Chunks of the vector-decay (GLA) intra-chunk term processed together: that term needs a
# [C, C, key_dim] decay tensor per chunk, so it is mapped over chunks to bound memory.
_VECTOR_DECAY_CHUNKS_PER_STEP = 8
# Tokens of a sub-chunk of that term: exact [sub, sub, key_dim] decays within one, matmuls of
# decayed queries and keys between them.
_SUB_CHUNK = 16


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
  """
  batch, seq, heads, _ = q.shape
  groups = heads // k.shape[2]
  chunk = min(chunk_size, seq)
  num_chunks = -(-seq // chunk)
  # Zero-padded tokens add nothing to the state and do not decay it.
  pad = [(0, 0), (0, num_chunks * chunk - seq), (0, 0), (0, 0)]

  def to_chunks(x):  # [b, t, h, d] -> [b, h, n, C, d], float32, zero-padded
    x = jnp.pad(x.astype(jnp.float32), pad)
    return x.reshape(batch, num_chunks, chunk, heads, -1).transpose(0, 3, 1, 2, 4)

  q_chunks = to_chunks(q)
  k_chunks = to_chunks(jnp.repeat(k, groups, axis=2))
  v_chunks = to_chunks(jnp.repeat(v, groups, axis=2))
  cum_decay = jnp.cumsum(to_chunks(log_decay), axis=3)  # G: [b, h, n, C, 1 | f]
  last_decay = cum_decay[:, :, :, -1:, :]

  k_to_chunk_end = k_chunks * jnp.exp(last_decay - cum_decay)
  chunk_kv = jnp.einsum("bhncf,bhncv->bhnfv", k_to_chunk_end, v_chunks)
  chunk_decay = jnp.exp(last_decay[:, :, :, 0, :])[..., None]  # [b, h, n, 1 | f, 1]

  def carry_state(state, xs):
    decay, kv = xs
    return decay * state + kv, state

  final_state, states_before = jax.lax.scan(
    carry_state,
    initial_state.astype(jnp.float32),
    (jnp.moveaxis(chunk_decay, 2, 0), jnp.moveaxis(chunk_kv, 2, 0)),
  )
  if not causal:
    return jnp.einsum("bthf,bhfv->bthv", q.astype(jnp.float32), final_state), final_state

  states_before = jnp.moveaxis(states_before, 0, 2)  # [b, h, n, f, dv]
  out = jnp.einsum("bhncf,bhnfv->bhncv", q_chunks * jnp.exp(cum_decay), states_before)
  scores = _intra_chunk_scores(q_chunks, k_chunks, cum_decay)
  out = out + jnp.einsum("bhnij,bhnjv->bhniv", scores, v_chunks)
  out = out.transpose(0, 2, 3, 1, 4).reshape(batch, num_chunks * chunk, heads, -1)
  return out[:, :seq], final_state


def _intra_chunk_scores(q_chunks, k_chunks, cum_decay) -> jax.Array:
  """Decayed causal scores `[b, h, n, C, C]`: `sum_f q_if k_jf exp(G_if - G_jf)`, j <= i."""
  chunk = q_chunks.shape[3]
  causal = jnp.tril(jnp.ones((chunk, chunk), bool))
  if cum_decay.shape[-1] == 1:
    g = cum_decay[..., 0]
    decay = jnp.exp(jnp.where(causal, g[..., :, None] - g[..., None, :], -jnp.inf))
    return jnp.einsum("bhnif,bhnjf->bhnij", q_chunks, k_chunks) * decay

  sub = _SUB_CHUNK if chunk % _SUB_CHUNK == 0 else chunk

  def one_chunk(xs):  # q, k, G: [b, h, C, f]
    return _vector_decay_chunk_scores(*xs, sub)

  chunk_major = [jnp.moveaxis(x, 2, 0) for x in (q_chunks, k_chunks, cum_decay)]
  scores = jax.lax.map(one_chunk, chunk_major, batch_size=_VECTOR_DECAY_CHUNKS_PER_STEP)
  return jnp.moveaxis(scores, 0, 2)


def _vector_decay_chunk_scores(q, k, g, sub: int) -> jax.Array:
  """Scores `[b, h, C, C]` of one chunk under a per-channel decay, `sub` tokens at a time.

  Within a sub-chunk the `[sub, sub, f]` decay tensor is exact. A key j of an earlier
  sub-chunk with last token e factors through e: `exp(G_i - G_j) = exp(G_i - G_e) exp(G_e -
  G_j)`, both exponents <= 0 (i after e, j at or before it), so those blocks are matmuls of
  decayed queries and keys, without the `[C, C, f]` tensor.
  """
  b, h, chunk, f = q.shape
  m = chunk // sub
  qs, ks, gs = (x.reshape(b, h, m, sub, f) for x in (q, k, g))
  causal = jnp.tril(jnp.ones((sub, sub), bool))
  diff = jnp.where(causal[..., None], gs[..., :, None, :] - gs[..., None, :, :], -jnp.inf)
  diagonal = jnp.einsum("bhmif,bhmjf,bhmijf->bhmij", qs, ks, jnp.exp(diff))
  scores = jnp.einsum("bhmij,mn->bhminj", diagonal, jnp.eye(m, dtype=q.dtype))
  scores = scores.reshape(b, h, chunk, chunk)
  if m == 1:
    return scores
  ends = gs[..., -1, :]  # [b, h, m, f]: G at each sub-chunk's last token
  keys = ks * jnp.exp(ends[..., None, :] - gs)  # [b, h, m, sub, f]
  later = (jnp.arange(chunk) // sub)[:, None] > jnp.arange(m)[None, :]  # query i after block
  to_end = jnp.where(later[..., None], g[..., :, None, :] - ends[..., None, :, :], -jnp.inf)
  queries = q[..., :, None, :] * jnp.exp(to_end)  # [b, h, C, m, f]
  earlier = jnp.einsum("bhimf,bhmjf->bhimj", queries, keys).reshape(b, h, chunk, chunk)
  return scores + earlier
