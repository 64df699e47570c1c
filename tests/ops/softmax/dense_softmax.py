"""An independent dense softmax attention for the variant tests (written out, not imported).

Everything in float32 with explicit `[batch, heads, q, kv]` weights, so each variant's test can
state its paper's formula on top of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def repeat_kv(x, heads):
  """`[b, t, hk, d]` -> `[b, t, heads, d]`, kv head j serving query heads j*g .. j*g+g-1."""
  return jnp.repeat(x, heads // x.shape[2], axis=2)


def logits(q, k, scale=None):
  """`[b, h, tq, tk]` float32 logits q . k * scale (GQA by repetition)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  k = repeat_kv(k.astype(jnp.float32), q.shape[2])
  return jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k) * scale


def causal_allowed(q_len, kv_len, q_offset=0):
  return jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None] + q_offset


def weighted_values(weights, v, heads):
  """`weights [b, h, tq, tk]`, `v [b, tk, hk, dv]` -> `[b, tq, h, dv]`."""
  return jnp.einsum("bhqk,bkhd->bqhd", weights, repeat_kv(v.astype(jnp.float32), heads))


def softmax_attention(q, k, v, *, causal=True, scale=None):
  """Plain (causal) multi-head softmax attention, float32 `[b, tq, h, dv]`."""
  s = logits(q, k, scale)
  if causal:
    s = jnp.where(causal_allowed(q.shape[1], k.shape[1]), s, -jnp.inf)
  return weighted_values(jax.nn.softmax(s, axis=-1), v, q.shape[2])
