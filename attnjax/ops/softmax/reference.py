"""Dense softmax attention in float32: the oracle every other implementation must equal."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax import masks as masks_lib
from attnjax.ops.qkv import QKVShape


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  shape: QKVShape,
  mask: masks_lib.Mask | None,
  segment_ids: masks_lib.SegmentIds | None,
  scale: float,
  softcap: float | None,
  sinks: jax.Array | None,
  q_offset: int,
  block_sizes=None,
) -> tuple[jax.Array, jax.Array]:
  """Materializes the `[batch, heads, q_len, kv_len]` logits; returns (out, lse).

  Args are validated by `attnjax.ops.dot_product_attention`. `out` is
  `[batch, q_len, heads, value_dim]` in q's dtype, `lse` is float32 `[batch, q_len, heads]`
  (the log of the softmax denominator, sink included; -inf for a fully masked row).
  `block_sizes` is accepted for a uniform signature and ignored.
  """
  del block_sizes
  s = shape
  allowed = jnp.asarray(masks_lib.to_dense(mask, s.q_len, s.kv_len, q_offset=q_offset))
  if allowed.ndim == 3:  # per-head mask [heads, q, kv]
    allowed = allowed.reshape(s.kv_heads, s.groups, s.q_len, s.kv_len)
  if segment_ids is not None:
    allowed = allowed & segment_ids.allowed(segment_ids.q, segment_ids.kv_ids)[:, None, None]
  return attend_allowed(q, k, v, allowed, shape=shape, scale=scale, softcap=softcap, sinks=sinks)


def attend_allowed(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  allowed: jax.Array,
  *,
  shape: QKVShape,
  scale: float,
  softcap: float | None,
  sinks: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
  """Float32 softmax attention over the keys where `allowed` is True; (out, lse) as
  `attention`.

  `allowed` (bool, may be traced) broadcasts to the logits `[batch, kv_heads, groups, q_len,
  kv_len]`.
  """
  s = shape
  logits = scaled_logits(q, k, shape=shape, scale=scale, softcap=softcap)
  allowed = jnp.broadcast_to(allowed, logits.shape)
  logits = jnp.where(allowed, logits, -jnp.inf)
  row_max = logits.max(-1)
  if sinks is not None:
    sink_logits = sinks.astype(jnp.float32).reshape(s.kv_heads, s.groups)[None, :, :, None]
    row_max = jnp.maximum(row_max, sink_logits)
  # Softmax is invariant to the shift, so it carries no gradient.
  shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  probs = jnp.where(allowed, jnp.exp(logits - shift[..., None]), 0.0)
  denom = probs.sum(-1)
  if sinks is not None:
    denom = denom + jnp.exp(sink_logits - shift)
  nonzero = denom > 0
  safe_denom = jnp.where(nonzero, denom, 1.0)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs / safe_denom[..., None], v.astype(jnp.float32))
  lse = jnp.where(nonzero, jnp.log(safe_denom) + shift, -jnp.inf)
  out = out.reshape(s.batch, s.q_len, s.heads, s.value_dim).astype(q.dtype)
  lse = lse.reshape(s.batch, s.heads, s.q_len).transpose(0, 2, 1)
  return out, lse


def scaled_logits(q, k, *, shape: QKVShape, scale: float, softcap: float | None) -> jax.Array:
  """Float32 logits `[batch, kv_heads, groups, q_len, kv_len]`: `scale * q . k`, soft-capped
  to `softcap * tanh(logit / softcap)` when `softcap` is set."""
  s = shape
  qf = q.astype(jnp.float32).reshape(s.batch, s.q_len, s.kv_heads, s.groups, s.head_dim)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qf, k.astype(jnp.float32)) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  return logits
