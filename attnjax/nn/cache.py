"""What a mixer keeps between `DecoderLM.decode` calls, and the errors of mixers that keep none.

Every decoding mixer has `init_cache(batch, max_len, dtype) -> cache` (a dict of arrays, a
pytree) and `decode(x [batch, n, embed], cache, position) -> (out, cache)`, `position` the
int32 position of `x[:, 0]` (may be traced). Softmax layers keep keys and values
(`[batch, max_len, kv_heads, head_dim]`), recurrent layers their state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


class Step(NamedTuple):
  """A decode call as a recurrent mixer sees it.

  Attributes:
    state: the state entering the chunk (the op's `initial_state`; None: zeros).
    start: int32 position of the chunk's first token (rotary angles).
  """

  state: Any
  start: jax.Array | int


def no_cache(variant: str, why: str = "its mixer has no decoding cache yet") -> ValueError:
  """The error of a layer that cannot decode, naming the variant."""
  return ValueError(
    f"variant {variant!r} cannot decode: {why}. Decoding covers the mask variants of "
    "softmax attention (softmax, sliding_window, chunked, prefix_lm), gated, sinks, selective, "
    "moh, softplus, aaren, gaussian and diffqkv, causal 1-D neighborhood attention, the "
    "linear-family mixers and the delta rule (deltanet, gated_deltanet)"
  )


def key_value_cache(mask, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> dict:
  """Zero keys and values `[batch, rows, kv_heads, head_dim]` in `dtype`: `rows` is `max_len`,
  or the lookback of `mask` (a `attnjax.masks.Mask` or None) when smaller, as a ring buffer
  whose row `p % rows` holds position `p`."""
  lookback = None if mask is None else mask.lookback
  rows = max_len if lookback is None or lookback >= max_len else lookback
  shape = (batch, rows, kv_heads, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}  # two buffers to donate


def attend_and_store(q, k, v, cache: dict, position, attention: Callable, keywords: dict):
  """(attention of the chunk `q, k, v` at positions `position + [0, n)` over a
  `key_value_cache` and itself, the cache holding the chunk's keys and values).

  `attention(q, k_rows, v_rows, *, q_start, kv_positions=None, **keywords)` is
  `attnjax.ops.softmax.cached.cached_attention` or a variant's own (`Variant.cached`).
  """
  n = q.shape[1]
  rows = position + jnp.arange(n, dtype=jnp.int32)
  mask = keywords.get("mask")
  if mask is None or mask.lookback is None or cache["k"].shape[1] > mask.lookback:
    cache = {
      name: jax.lax.dynamic_update_slice_in_dim(
        cache[name], new.astype(cache[name].dtype), position, axis=1
      )
      for name, new in (("k", k), ("v", v))
    }
    return attention(q, cache["k"], cache["v"], q_start=position, **keywords), cache
  # Ring buffer: attend to its rows and the new chunk, then keep the latest `size` keys.
  size = cache["k"].shape[1]
  slots = jnp.arange(size, dtype=jnp.int32)
  held = position - 1 - jnp.mod(position - 1 - slots, size)  # latest position < start
  keys, values = (
    jnp.concatenate([cache[name], new.astype(cache[name].dtype)], axis=1)
    for name, new in (("k", k), ("v", v))
  )
  out = attention(
    q, keys, values, q_start=position, kv_positions=jnp.concatenate([held, rows]), **keywords
  )
  kept = slice(max(n - size, 0), n)
  cache = {
    name: cache[name].at[:, jnp.mod(rows[kept], size)].set(new[:, kept].astype(cache[name].dtype))
    for name, new in (("k", k), ("v", v))
  }
  return out, cache


def logical_specs(cache) -> Any:
  """The logical axes of every array of a `DecoderLM` cache, as `PartitionSpec`s of names.

  Keys and values `("batch", None, "kv_heads", "head_dim")`, recurrent states
  `("batch", "heads", None, ...)`, short-convolution inputs `("batch", None, None)`,
  `RecycledAttention`'s kept positions `("batch", "kv_heads", None)` and last full-step
  queries `("batch", "heads", None)`, `TidalDecode`'s chosen positions `("batch", None)`, the
  position and length `()`. Map them to mesh axes with the model's rules
  (`attnjax.training.sharding.tree_shardings`) to shard a cache like the model.
  """

  def spec(path, x):
    keys = {getattr(entry, "key", None) for entry in path}
    if keys & {"k", "v", "sink_k", "sink_v"}:
      return PartitionSpec("batch", None, "kv_heads", "head_dim")
    if "conv" in keys:
      return PartitionSpec("batch", None, None)
    if "state" in keys or "full_query" in keys:
      return PartitionSpec("batch", "heads", *([None] * (x.ndim - 2)))
    if "selected" in keys:
      return PartitionSpec("batch", "kv_heads", None)
    if "chosen" in keys:
      return PartitionSpec("batch", None)
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(spec, cache)
