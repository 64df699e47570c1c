"""Recycled Attention: a softmax layer's decoding that attends to its whole cache only every
`stride` steps.

Xu et al. 2024, "Recycled Attention: Efficient inference for long-context language models"
(arXiv 2411.05787). Attention in a trained model is concentrated on few keys, and which keys
changes slowly from one generated token to the next. So a full step (the prompt, and every
`stride`-th generated token) attends to every cached key and keeps, per kv head, the `top_k`
positions that received the most attention from its last query (summed over the query heads
of the GQA group); the steps in between attend only to those positions and the ones generated
since the full step, reading `top_k + stride - 1` keys instead of the whole context. The
cache still holds every key (the paper's point is compute and memory traffic, not cache size).
With `similarity`, a step is also full when its query's mean cosine similarity (over heads) to
the last full step's drops below it, the paper's dynamic schedule.

`stride=1`, or `top_k` at least the cache length, is the full model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attnjax.nn import key_selection
from attnjax.ops.qkv import resolve_scale
from attnjax.ops.softmax import cached


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class RecycledAttention:
  """Attend to the whole cache every `stride` decode steps and to the `top_k` keys of the last
  full step (per kv head) plus the tokens generated since in between
  (`DecoderLM.init_cache(..., policy=RecycledAttention(stride=10, top_k=256))`).

  Attributes:
    stride: decode steps per full step (>= 1; 1 attends fully at every step).
    top_k: positions kept per kv head at a full step (>= 1; capped at the cache length).
    similarity: in [-1, 1] or None; a step is also full when the mean cosine similarity of
      its queries to the last full step's falls below it.
  """

  stride: int = 10
  top_k: int = 256
  similarity: float | None = None

  def __post_init__(self):
    for name in ("stride", "top_k"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
    if self.similarity is not None and not -1.0 <= self.similarity <= 1.0:
      raise ValueError(f"similarity must be in [-1, 1] or None, got similarity={self.similarity}")


def init_cache(
  policy: RecycledAttention, batch: int, max_len: int, heads: int, kv_heads: int, head_dim: int,
  dtype,
) -> dict:  # fmt: skip
  """Every position's keys and values `[batch, max_len, kv_heads, head_dim]`, the positions
  kept at the last full step `selected [batch, kv_heads, top_k]` (-1: none), that step's
  position `full_at` (-1: none yet) and last queries `full_query [batch, heads, head_dim]`."""
  rows = jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)
  return {
    "k": rows,
    "v": jnp.zeros_like(rows),
    "selected": jnp.full((batch, kv_heads, min(policy.top_k, max_len)), -1, jnp.int32),
    "full_at": jnp.full((), -1, jnp.int32),
    "full_query": jnp.zeros((batch, heads, head_dim), jnp.float32),
    "policy": policy,
  }


def is_recycled(cache: dict) -> bool:
  return isinstance(cache.get("policy"), RecycledAttention)


def attend(q, k, v, cache: dict, position, *, keywords: dict):
  """(the chunk's attention under the policy, the cache holding it); `q, k, v` at positions
  `position + [0, n)`, `keywords` the variant's `cached_attention` keywords (mask over
  absolute positions, scale, softcap, sinks). A chunk of several tokens is a full step."""
  policy: RecycledAttention = cache["policy"]
  n = q.shape[1]
  keys, values = key_selection.store(cache, k, v, position)
  keywords = {**keywords, "scale": resolve_scale(keywords.get("scale"), q.shape[3])}
  last = position + n - 1

  def full_step(_):
    out, lse = cached.cached_attention(
      q, keys, values, q_start=position, return_lse=True, **keywords
    )
    selected = key_selection.most_attended(
      q[:, -1:], keys, lse[:, -1:], last, cache["selected"].shape[2], keywords, per_kv_head=True
    )
    return out, selected, last, q[:, -1].astype(jnp.float32)

  def recycled_step(_):
    out = _attend_kept(
      q, keys, values, cache["selected"], cache["full_at"], position, keywords, policy.stride - 1
    )
    return out, cache["selected"], cache["full_at"], cache["full_query"]

  if n > 1:
    out, selected, full_at, full_query = full_step(None)
  else:
    due = (position - cache["full_at"] >= policy.stride) | (cache["full_at"] < 0)
    if policy.similarity is not None:
      due = due | (_mean_cosine(q[:, 0], cache["full_query"]) < policy.similarity)
    out, selected, full_at, full_query = jax.lax.cond(due, full_step, recycled_step, None)
  cache = {
    **cache,
    "k": keys,
    "v": values,
    "selected": selected,
    "full_at": jnp.asarray(full_at, jnp.int32),
    "full_query": full_query,
  }
  return out, cache


def _mean_cosine(a, b) -> jax.Array:
  """Mean over batch and heads of the cosine similarity of `[batch, heads, dim]` rows."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  dot = jnp.sum(a * b, -1)
  norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return jnp.mean(dot / jnp.maximum(norms, 1e-30))


def _attend_kept(q, keys, values, selected, full_at, position, keywords: dict, recent: int):
  """Attention of the one-token `q` at `position` over the `selected` positions and the
  `recent` ones after the full step `full_at` (up to `position`), per kv head."""
  batch, _, kv_heads, _ = keys.shape
  recent = full_at + 1 + jnp.arange(recent, dtype=jnp.int32)
  recent = jnp.where(recent <= position, recent, -1)
  kept = jnp.concatenate(
    [selected, jnp.broadcast_to(recent, (batch, kv_heads, recent.shape[0]))], axis=-1
  )
  return key_selection.attend_to(q, keys, values, kept, position, keywords)
