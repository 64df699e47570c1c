"""StreamingLLM: a softmax layer's decoding cache of attention sinks plus a recent window.

Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024,
arXiv 2309.17453): a model trained with full causal attention puts much of its attention on
the first tokens whatever they hold ("attention sinks"), so a cache of only the most recent
tokens collapses as soon as the first ones are evicted, while keeping the keys and values of
the first `sink_tokens` positions next to the `window` most recent ones recovers the model
on streams far longer than its training length, in constant memory. Positions are those
within the cache (Sec. 3.2): at query position `t`, with `m = max(0, t + 1 - window -
sink_tokens)` positions evicted, the sinks keep positions `0 ... sink_tokens - 1` and the
window's keys and the query move `m` positions down.

Rotary scores depend only on the distance between query and key. Within the window the cache
positions keep every distance, so the cache stores keys rotated at their own positions (as the
full cache does) and only the sink keys need another distance: they are scored with the query
rotated back by `m`. One attention call covers both with queries and keys of twice the head
dim, `[q, q_sink] . [k, 0]` for window keys and `[q, q_sink] . [0, k]` for sink keys, so the
softmax (and a variant's sink logits or soft-capping) runs over both sets at once.

`sink_tokens=0` is the paper's window-attention baseline.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from attnjax import masks
from attnjax.nn.rope import apply_rope
from attnjax.ops.qkv import resolve_scale
from attnjax.ops.softmax import cached


@dataclasses.dataclass(frozen=True)
class StreamingLLM:
  """Keep the first `sink_tokens` positions and the `window` most recent ones (the query's
  own included) in every softmax layer's cache: `sink_tokens + window` rows per layer, for a
  stream of any length (`DecoderLM.init_cache(..., policy=StreamingLLM(4, 1020))`)."""

  sink_tokens: int = 4
  window: int = 1020

  def __post_init__(self):
    for name, low in (("sink_tokens", 0), ("window", 1)):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {name}={value!r}")

  def mask(self) -> masks.Mask:
    """What a query sees over absolute positions: the sinks and its window."""
    return masks.causal() & (masks.sliding_window(self.window - 1) | masks.sinks(self.sink_tokens))


def init_cache(policy: StreamingLLM, batch: int, kv_heads: int, head_dim: int, dtype) -> dict:
  """Zero sink keys and values `[batch, sink_tokens, kv_heads, head_dim]` and a ring of
  `window` recent ones; ring row `(p - sink_tokens) % window` holds position `p`."""

  def rows(n):
    return jnp.zeros((batch, n, kv_heads, head_dim), dtype)

  return {
    "sink_k": rows(policy.sink_tokens),
    "sink_v": rows(policy.sink_tokens),
    "k": rows(policy.window),
    "v": rows(policy.window),
  }


def is_streaming(cache: dict) -> bool:
  return "sink_k" in cache


def attend(q, k, v, cache: dict, position, *, keywords: dict, rope_base: float | None):
  """(the chunk's attention under the policy, the cache holding it); `q, k, v` rotated at
  their positions `position + [0, n)` (`rope_base=None`: the layer has no rotary positions),
  `keywords` the variant's `cached_attention` keywords (mask over absolute positions, scale,
  sinks, ...)."""
  sinks, window = cache["sink_k"].shape[1], cache["k"].shape[1]
  policy = StreamingLLM(sinks, window)
  n, head_dim = q.shape[1], q.shape[3]
  rows = position + jnp.arange(n, dtype=jnp.int32)
  sink_slots = jnp.arange(sinks, dtype=jnp.int32)
  sink_held = jnp.where(sink_slots < position, sink_slots, -1)
  ring_slots = jnp.arange(window, dtype=jnp.int32)
  ring_held = position - 1 - jnp.mod(position - 1 - sinks - ring_slots, window)
  ring_held = jnp.where(ring_held >= sinks, ring_held, -1)
  evicted = jnp.maximum(rows + 1 - window - sinks, 0)
  q_sink = q if rope_base is None else apply_rope(q, -evicted, base=rope_base).astype(q.dtype)

  def cast(x):
    return x.astype(cache["k"].dtype)

  keys = jnp.concatenate([cache["sink_k"], cache["k"], cast(k)], axis=1)
  values = jnp.concatenate([cache["sink_v"], cache["v"], cast(v)], axis=1)
  positions = jnp.concatenate([sink_held, ring_held, rows])
  as_sink = (positions < sinks)[None, :, None, None]
  zeros = jnp.zeros_like(keys)
  keys = jnp.concatenate([jnp.where(as_sink, zeros, keys), jnp.where(as_sink, keys, zeros)], -1)
  keywords = {
    **keywords,
    "mask": keywords["mask"] & policy.mask(),
    "scale": resolve_scale(keywords.get("scale"), head_dim),
  }
  out = cached.cached_attention(
    jnp.concatenate([q, q_sink], axis=-1),
    keys,
    values,
    q_start=position,
    kv_positions=positions,
    **keywords,
  )
  kept = slice(max(n - window, 0), n)
  ring_rows = jnp.where(rows[kept] >= sinks, jnp.mod(rows[kept] - sinks, window), window)
  sink_rows = jnp.where(rows < sinks, rows, sinks)
  cache = {
    "sink_k": cache["sink_k"].at[:, sink_rows].set(cast(k), mode="drop"),
    "sink_v": cache["sink_v"].at[:, sink_rows].set(cast(v), mode="drop"),
    "k": cache["k"].at[:, ring_rows].set(cast(k[:, kept]), mode="drop"),
    "v": cache["v"].at[:, ring_rows].set(cast(v[:, kept]), mode="drop"),
  }
  return out, cache
