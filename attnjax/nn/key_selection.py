"""Decoding over a few chosen cache positions: which positions a query attends to most, and
attention restricted to given positions. Shared by the cache policies that attend sparsely
(`recycled.RecycledAttention`, `tidal.TidalDecode`).

Keys and values are a full cache `[batch, rows, kv_heads, dim]` whose row p holds position p;
`keywords` are a variant's `cached_attention` keywords with the scale resolved (mask over
absolute positions, scale, softcap, sinks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax import masks as masks_lib
from attnjax.ops.qkv import check_qkv
from attnjax.ops.softmax import reference


def _mask(keywords: dict) -> masks_lib.Mask:
  mask = keywords.get("mask")
  return masks_lib.causal() if mask is None else mask


def most_attended(q_last, keys, lse_last, last, top_k: int, keywords: dict, *, per_kv_head: bool):
  """The `top_k` positions the query `q_last [batch, 1, heads, dim]` at position `last` gives
  the most attention, its probabilities (from its log-sum-exp `lse_last [batch, 1, heads]`)
  summed over each kv head's query heads (`[batch, kv_heads, top_k]`) or over all heads
  (`per_kv_head=False`: `[batch, top_k]`); -1 where fewer keys were allowed."""
  shape = check_qkv(q_last, keys, keys)
  positions = jnp.arange(shape.kv_len, dtype=jnp.int32)
  heads = jnp.arange(shape.heads).reshape(shape.kv_heads, shape.groups, 1)
  allowed = (positions <= last) & _mask(keywords).on_arrays(last, positions, heads)
  allowed = jnp.broadcast_to(allowed, (shape.kv_heads, shape.groups, shape.kv_len))
  logits = reference.scaled_logits(
    q_last, keys, shape=shape, scale=keywords["scale"], softcap=keywords.get("softcap")
  )[:, :, :, 0]  # [batch, kv_heads, groups, kv_len]
  lse = lse_last[:, 0].reshape(shape.batch, shape.kv_heads, shape.groups, 1)
  probs = jnp.where(allowed, jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)
  mass, allowed = probs.sum(2), jnp.any(allowed, axis=1)  # per kv head
  if not per_kv_head:
    mass, allowed = mass.sum(1), jnp.any(allowed, axis=0)
  mass = jnp.where(allowed, mass, -1.0)  # disallowed keys rank last
  _, top = jax.lax.top_k(mass, top_k)
  return jnp.where(jnp.take_along_axis(mass, top, -1) >= 0, top, -1).astype(jnp.int32)


def attend_to(q, keys, values, kept, position, keywords: dict) -> jax.Array:
  """Attention of the one-token `q [batch, 1, heads, dim]` at `position` over the positions
  `kept [batch, kv_heads, n]` of each kv head (-1: none; no position twice)."""
  batch, _, kv_heads, _ = keys.shape
  rows = jnp.maximum(kept, 0).transpose(0, 2, 1)[..., None]  # [batch, n, kv_heads, 1]
  k_kept = jnp.take_along_axis(keys, rows, axis=1)
  v_kept = jnp.take_along_axis(values, rows, axis=1)
  shape = check_qkv(q, k_kept, v_kept)
  kept = kept[:, :, None, :]  # [batch, kv_heads, 1 (groups), n]
  heads = jnp.arange(shape.heads).reshape(1, kv_heads, shape.groups, 1)
  allowed = (kept >= 0) & _mask(keywords).on_arrays(position, kept, heads)
  out, _ = reference.attend_allowed(
    q, k_kept, v_kept, allowed[:, :, :, None, :], shape=shape, scale=keywords["scale"],
    softcap=keywords.get("softcap"), sinks=keywords.get("sinks"),
  )  # fmt: skip
  return out


def store(cache: dict, k, v, position) -> tuple[jax.Array, jax.Array]:
  """The cache's keys and values with the chunk `k, v` written at rows `position...`."""
  return tuple(
    jax.lax.dynamic_update_slice_in_dim(cache[name], new.astype(cache[name].dtype), position, 1)
    for name, new in (("k", k), ("v", v))
  )
