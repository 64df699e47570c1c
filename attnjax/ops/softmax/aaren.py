"""Aaren: attention as a many-to-many RNN (Feng et al. 2024, "Attention as an RNN",
arXiv 2405.13956).

With one query `q` shared by every step (Aaren learns it as a parameter), causal softmax
attention

    s_j = q . k_j * scale,   o_t = sum_{j <= t} exp(s_j - m_t) v_j / sum_{j <= t} exp(s_j - m_t)

is a prefix reduction over the triples (m, u, w) = (running max, denominator, numerator), each
token starting as (s_j, 1, v_j) and combined by the paper's associative operator

    (m_a, u_a, w_a) (+) (m_b, u_b, w_b) = (m, u_a e^{m_a - m} + u_b e^{m_b - m},
                                           w_a e^{m_a - m} + w_b e^{m_b - m}),  m = max(m_a, m_b)

so all outputs come from one parallel prefix scan (`jax.lax.associative_scan`, impl "xla",
O(seq * dv) memory) and a stream advances with a constant-size state (`aaren_step` one token
at a time, `aaren_chunk` several). The dense reference materializes the `[seq, seq]` causal
weights.
Interpretations: the logits are scaled by `scale` (default head_dim ** -0.5, as in dot-product
attention), there is one learned query per head (multi-head Aaren), and `segment_ids` restart
the recurrence (packed sequences).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnjax import registry
from attnjax.ops.qkv import QKVShape, check_qkv, resolve_scale


class AarenState(NamedTuple):
  """Running (max, denominator, numerator) per head: float32 `[b, h]`, `[b, h]`, `[b, h, dv]`."""

  max: jax.Array
  denom: jax.Array
  numer: jax.Array


def aaren(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  segment_ids: jax.Array | None = None,
  scale: float | None = None,
  impl: str = "auto",
) -> jax.Array:
  """Causal softmax attention of one query per head over every prefix of `k`, `v`.

  Args:
    q: `[batch, 1, heads, head_dim]`, the query shared by all steps.
    k: `[batch, seq, kv_heads, head_dim]`; `heads % kv_heads == 0`.
    v: `[batch, seq, kv_heads, value_dim]`.
    segment_ids: int `[batch, seq]`; the recurrence restarts where the id changes.
    scale: logit scale; None means `head_dim ** -0.5`.
    impl: "reference" (dense) | "xla" (associative scan) | "auto".

  Returns:
    `[batch, seq, heads, value_dim]` in q's dtype: output t equals causal softmax attention
    of query `q` over keys 0..t.
  """
  shape = check_qkv(q, k, v)
  if shape.q_len != 1:
    raise ValueError(f"q must be [batch, 1, heads, head_dim] (one shared query), got {q.shape}")
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != (shape.batch, shape.kv_len):
      raise ValueError(
        f"segment_ids must be [batch, seq] = ({shape.batch}, {shape.kv_len}), "
        f"got {segment_ids.shape}"
      )
  scale = resolve_scale(scale, shape.head_dim)
  return registry.dispatch(IMPLS, impl, q, k, v, shape=shape, segment_ids=segment_ids, scale=scale)


def _scores(q, k, shape: QKVShape, scale: float) -> jax.Array:
  """float32 `[batch, seq, heads]` logits q . k_t * scale (kv heads repeated for GQA)."""
  k = jnp.repeat(k.astype(jnp.float32), shape.groups, axis=2)
  return jnp.einsum("bhd,bthd->bth", q[:, 0].astype(jnp.float32), k) * scale


def _values(v, shape: QKVShape) -> jax.Array:
  return jnp.repeat(v.astype(jnp.float32), shape.groups, axis=2)


def _reference(q, k, v, *, shape: QKVShape, segment_ids, scale):
  scores = _scores(q, k, shape, scale)  # [b, t, h]
  t = shape.kv_len
  allowed = jnp.tril(jnp.ones((t, t), bool))[None]
  if segment_ids is not None:
    allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
  logits = jnp.where(allowed[..., None], scores[:, None, :, :], -jnp.inf)  # [b, t, j, h]
  weights = jax.nn.softmax(logits, axis=2)
  out = jnp.einsum("btjh,bjhd->bthd", weights, _values(v, shape))
  return out.astype(q.dtype)


def _combine(a, b):
  """Associative combine of (reset, max, denom, numer) prefix summaries, a before b."""
  reset_a, m_a, u_a, w_a = a
  reset_b, m_b, u_b, w_b = b
  m = jnp.maximum(m_a, m_b)
  # A reset inside b (a new segment starts) drops everything before it.
  keep_a = jnp.where(reset_b, 0.0, jnp.exp(m_a - m))
  m = jnp.where(reset_b, m_b, m)
  keep_b = jnp.exp(m_b - m)
  return (
    reset_a | reset_b,
    m,
    u_a * keep_a + u_b * keep_b,
    w_a * keep_a[..., None] + w_b * keep_b[..., None],
  )


def _scan(q, k, v, *, shape: QKVShape, segment_ids, scale):
  scores = _scores(q, k, shape, scale)  # [b, t, h]
  if segment_ids is None:
    reset = jnp.zeros(scores.shape, bool)
  else:
    starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    reset = jnp.broadcast_to(starts[..., None], scores.shape)
  # Each token alone: max s_t, denominator 1, numerator v_t (shifted by its own max).
  leaves = (reset, scores, jnp.ones_like(scores), _values(v, shape))
  _, _, denom, numer = jax.lax.associative_scan(_combine, leaves, axis=1)
  return (numer / denom[..., None]).astype(q.dtype)


def aaren_init_state(batch: int, heads: int, value_dim: int) -> AarenState:
  """The empty prefix: max -inf, zero denominator and numerator."""
  return AarenState(
    jnp.full((batch, heads), -jnp.inf, jnp.float32),
    jnp.zeros((batch, heads), jnp.float32),
    jnp.zeros((batch, heads, value_dim), jnp.float32),
  )


def aaren_step(
  state: AarenState,
  q: jax.Array,
  k_t: jax.Array,
  v_t: jax.Array,
  *,
  scale: float | None = None,
) -> tuple[jax.Array, AarenState]:
  """One streaming step with constant memory: `(o_t, new_state)`.

  Args:
    state: the summary of tokens 0..t-1 (`aaren_init_state` for t = 0).
    q: `[batch, 1, heads, head_dim]`, the shared query.
    k_t: `[batch, 1, kv_heads, head_dim]`, v_t: `[batch, 1, kv_heads, value_dim]`.

  Returns:
    `o_t [batch, 1, heads, value_dim]` in q's dtype and the summary of tokens 0..t.
  """
  if k_t.ndim != 4 or k_t.shape[1] != 1:
    raise ValueError(f"aaren_step takes one token: q, k_t, v_t must have seq 1, got k {k_t.shape}")
  return aaren_chunk(state, q, k_t, v_t, scale=scale)


def aaren_chunk(
  state: AarenState, q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None
) -> tuple[jax.Array, AarenState]:
  """The next `n` tokens of a stream from the summary of those before: `(out, new_state)`.

  Args:
    state: the summary of the tokens before the chunk (`aaren_init_state` at the start).
    q: `[batch, 1, heads, head_dim]`, the shared query.
    k: `[batch, n, kv_heads, head_dim]`, v: `[batch, n, kv_heads, value_dim]`.

  Returns:
    `out [batch, n, heads, value_dim]` in q's dtype (output t attends the state's tokens and
    the chunk's up to t) and the summary of every token so far.
  """
  shape = check_qkv(q, k, v)
  if shape.q_len != 1:
    raise ValueError(f"q must be [batch, 1, heads, head_dim] (one shared query), got {q.shape}")
  wanted = aaren_init_state(shape.batch, shape.heads, shape.value_dim)
  for name, got, want in zip(AarenState._fields, state, wanted, strict=True):
    if got.shape != want.shape:
      raise ValueError(f"state.{name} must have shape {want.shape}, got {got.shape}")
  scores = _scores(q, k, shape, resolve_scale(scale, shape.head_dim))  # [b, n, h]
  leaves = (jnp.zeros(scores.shape, bool), scores, jnp.ones_like(scores), _values(v, shape))
  prefixes = jax.lax.associative_scan(_combine, leaves, axis=1)
  before = (False, state.max[:, None], state.denom[:, None], state.numer[:, None])
  _, m, u, w = _combine(before, prefixes)
  new_state = AarenState(m[:, -1], u[:, -1], w[:, -1])
  return (w / u[..., None]).astype(q.dtype), new_state


IMPLS = {"reference": _reference, "xla": _scan}


def _example(key, *, batch, seq, heads, kv_heads, head_dim):
  q, k, v = registry.random_qkv(
    key, batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim
  )
  return (q[:, :1], k, v), {}


registry.register(
  "aaren",
  aaren,
  family="softmax",
  paper="Feng et al. 2024, Attention as an RNN (arXiv 2405.13956)",
  description="one learned query, causal softmax as a prefix scan; constant-memory step",
  capabilities=registry.Capabilities(causal=True, segment_ids=True),
  impls=tuple(IMPLS),
  module="attnjax.nn.softmax_variants:AarenAttention",
  example=_example,
)
