"""DeBERTa's disentangled attention (He et al. 2021, "DeBERTa: Decoding-enhanced BERT with
Disentangled Attention", arXiv 2006.03654), bidirectional.

Every token has a content vector and every query-key pair a relative position, embedded
separately. Equation by equation (the paper's eqs. 2 and 4 and its Algorithm 1):

    delta(i, j) = 0            if i - j <= -k
                = 2k - 1       if i - j >= k
                = i - j + k    otherwise                   (k = num_buckets // 2)
    s_ij  = q_i . k_j                                      content-to-content
          + q_i . k^r_{delta(i, j)}                        content-to-position
          + k_j . q^r_{delta(j, i)}                        position-to-content
    out_i = softmax_j(s_ij / sqrt(3 d)) v_j

where `q^r`, `k^r` `[num_buckets, heads, head_dim]` are projections of the relative position
embeddings (the mixer makes them). Position-to-content indexes the position query by
delta(j, i), the distance of the query position i seen from the key j, as the paper writes it;
the released DeBERTa code gathers the same term with delta(i, j), so checkpoints trained with
it differ from this op in the sign of that index.

`max_distance` switches to the log buckets of DeBERTa v2's code (not in the paper's equations):
distances up to k // 2 in magnitude stay exact, larger ones share buckets spaced
logarithmically up to `max_distance`, where they saturate.

The op materializes the `[q_len, kv_len]` logits (impl "reference" only).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks, registry
from attnjax.ops.qkv import QKVShape, check_qkv


def relative_buckets(
  distance: np.ndarray, num_buckets: int, max_distance: int | None = None
) -> np.ndarray:
  """int32 bucket in `[0, num_buckets)` of each signed distance (query pos - key pos).

  With `k = num_buckets // 2`: `max_distance=None` gives the paper's delta, `clip(d + k, 0,
  2k - 1)`. Otherwise DeBERTa v2's log buckets: with `mid = k // 2`, `|d| <= mid` keeps `d`,
  and a larger `|d|` (clipped to `max_distance - 1`) becomes `sign(d) * (mid + ceil(log(|d| /
  mid) / log((max_distance - 1) / mid) * (mid - 1)))`, before the same `+ k` and clip.
  Distances are static positions: the buckets are computed in numpy, in float64.
  """
  distance = np.asarray(distance, np.int64)
  span = num_buckets // 2
  if max_distance is not None:
    mid = span // 2
    clipped = np.clip(distance, -(max_distance - 1), max_distance - 1)
    magnitude = np.abs(clipped)
    log_steps = np.log(np.maximum(magnitude, mid) / mid) / math.log((max_distance - 1) / mid)
    far = mid + np.ceil(log_steps * (mid - 1)).astype(np.int64)
    distance = np.where(magnitude <= mid, clipped, np.sign(clipped) * far)
  return np.clip(distance + span, 0, 2 * span - 1).astype(np.int32)


def disentangled_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_rel: jax.Array,
  k_rel: jax.Array,
  *,
  max_distance: int | None = None,
  causal: bool = False,
  mask: masks.Mask | None = None,
  segment_ids: jax.Array | None = None,
  scale: float | None = None,
  impl: str = "auto",
) -> jax.Array:
  """Disentangled attention over `[batch, seq, heads, dim]`.

  Args:
    q: `[batch, q_len, heads, head_dim]` content queries.
    k: `[batch, kv_len, kv_heads, head_dim]` content keys; v `[batch, kv_len, kv_heads, dv]`.
    q_rel: `[num_buckets, heads, head_dim]`, queries of the relative position embeddings.
    k_rel: `[num_buckets, kv_heads, head_dim]`, their keys.
    max_distance: None: the paper's buckets, distances clipped at `num_buckets // 2`; an
      int: DeBERTa v2's log buckets, saturating at that distance (`> num_buckets // 4 + 1`).
    causal: each query sees only keys at or before its position (for next-token training;
      DeBERTa itself is bidirectional).
    mask: optional `attnjax.masks.Mask`, combined with `causal` (None: no mask).
    segment_ids: int `[batch, seq]` for packed sequences (self attention).
    scale: logit scale; None means `(3 * head_dim) ** -0.5`.
    impl: "reference" | "auto".

  Returns:
    `[batch, q_len, heads, value_dim]` in q's dtype; a row with no allowed key is zeros.
  """
  shape = check_qkv(q, k, v)
  num_buckets = q_rel.shape[0] if q_rel.ndim == 3 else -1
  for name, x, heads in (("q_rel", q_rel, shape.heads), ("k_rel", k_rel, shape.kv_heads)):
    wanted = (num_buckets, heads, shape.head_dim)
    if x.ndim != 3 or x.shape != wanted or num_buckets < 2:
      raise ValueError(
        f"{name} must be [num_buckets >= 2, heads, head_dim] = {wanted}, got {x.shape}"
      )
  if max_distance is not None and (num_buckets < 4 or max_distance <= num_buckets // 4 + 1):
    raise ValueError(
      f"log buckets need num_buckets >= 4 and max_distance > num_buckets // 4 + 1, got "
      f"num_buckets={num_buckets}, max_distance={max_distance}"
    )
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    if shape.q_len != shape.kv_len or segment_ids.shape != (shape.batch, shape.q_len):
      raise ValueError(
        f"segment_ids must be [batch, seq] = ({shape.batch}, {shape.q_len}) for self "
        f"attention, got {segment_ids.shape}"
      )
  scale = (3 * shape.head_dim) ** -0.5 if scale is None else float(scale)
  if causal:
    mask = masks.causal() if mask is None else masks.causal() & mask
  return registry.dispatch(
    IMPLS,
    impl,
    q,
    k,
    v,
    q_rel,
    k_rel,
    shape=shape,
    max_distance=max_distance,
    mask=mask,
    segment_ids=segment_ids,
    scale=scale,
  )


def _reference(q, k, v, q_rel, k_rel, *, shape: QKVShape, max_distance, mask, segment_ids, scale):
  s, f32 = shape, jnp.float32
  qg = q.astype(f32).reshape(s.batch, s.q_len, s.kv_heads, s.groups, s.head_dim)
  q_rel_g = q_rel.astype(f32).reshape(-1, s.kv_heads, s.groups, s.head_dim)
  content = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(f32))
  distance = np.arange(s.q_len)[:, None] - np.arange(s.kv_len)[None, :]
  buckets = relative_buckets(distance, q_rel.shape[0], max_distance)  # delta(i, j)  [q, kv]
  # Content-to-position: q_i against the position key of bucket delta(i, j).
  c2p = jnp.einsum("bqhgd,rhd->bhgqr", qg, k_rel.astype(f32))
  c2p = jnp.take_along_axis(c2p, jnp.broadcast_to(buckets, (*c2p.shape[:3], s.q_len, s.kv_len)), -1)
  # Position-to-content: k_j against the position query of bucket delta(j, i) (distance j - i).
  p2c = jnp.einsum("bkhd,rhgd->bhgkr", k.astype(f32), q_rel_g)
  reverse = relative_buckets(-distance, q_rel.shape[0], max_distance).T  # [kv, q]
  p2c = jnp.take_along_axis(p2c, jnp.broadcast_to(reverse, (*p2c.shape[:3], s.kv_len, s.q_len)), -1)
  logits = (content + c2p + p2c.swapaxes(-1, -2)) * scale
  allowed = jnp.asarray(masks.to_dense(mask, s.q_len, s.kv_len))
  if segment_ids is not None:
    allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None, None]
  allowed = jnp.broadcast_to(allowed, logits.shape)
  logits = jnp.where(allowed, logits, -jnp.inf)
  row_max = logits.max(-1, keepdims=True)
  shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  weights = jnp.where(allowed, jnp.exp(logits - shift), 0.0)
  denom = weights.sum(-1, keepdims=True)
  probs = weights / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v.astype(f32))
  return out.reshape(s.batch, s.q_len, s.heads, s.value_dim).astype(q.dtype)


IMPLS = {"reference": _reference}


def _example(key, *, batch, seq, heads, kv_heads, head_dim):
  q, k, v = registry.random_qkv(
    key, batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim
  )
  k_q, k_k = jax.random.split(jax.random.fold_in(key, 1))
  q_rel = jax.random.normal(k_q, (8, heads, head_dim))
  k_rel = jax.random.normal(k_k, (8, kv_heads, head_dim))
  return (q, k, v, q_rel, k_rel), {}


registry.register(
  "disentangled",
  disentangled_attention,
  family="softmax",
  paper="He et al. 2021, DeBERTa: Decoding-enhanced BERT with Disentangled Attention "
  "(arXiv 2006.03654)",
  description="content-to-content + content-to-position + position-to-content, bucketed",
  capabilities=registry.Capabilities(
    causal=True, bidirectional=True, causal_keyword=True, mask=True, segment_ids=True
  ),
  impls=tuple(IMPLS),
  module="attnjax.nn.softmax_variants:DisentangledAttention",
  example=_example,
)
