"""Attention sinks: a learned sink logit per head, and learned sink tokens.

StreamingLLM (Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks",
arXiv 2309.17453) observes that softmax attention parks surplus probability on the first
tokens and proposes pre-training with a dedicated learnable sink token prepended to every
sequence. Both forms implemented here join the softmax denominator of query i:

    s_ij  = q_i . k_j * scale                                 (allowed keys j)
    t_in  = q_i . sink_k_n * scale                            (sink tokens n, always visible)
    Z_i   = exp(sink_h) + sum_n exp(t_in) + sum_j exp(s_ij)
    out_i = (sum_n exp(t_in) sink_v_n + sum_j exp(s_ij) v_j) / Z_i

`sink_h` is a learned logit per head that carries no value: the closed form gpt-oss uses,
a softmax over the row's logits concatenated with `sink_h`, whose last column is dropped.
`sink_k`, `sink_v` are the keys and values of learned sink tokens, visible to every query
whatever the mask and segments. Interpretation: StreamingLLM's sink token is an input token
whose hidden state every layer computes; here each layer learns its sink tokens' keys and
values directly (what that token amounts to at one layer, without its position). The token
part is computed as its own small attention and merged through the log-sum-exp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attnjax import masks, registry
from attnjax.ops.qkv import check_qkv
from attnjax.ops.softmax import api as softmax_api


def sink_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  sinks: jax.Array | None = None,
  sink_k: jax.Array | None = None,
  sink_v: jax.Array | None = None,
  impl: str = "auto",
  **attention_kwargs,
) -> jax.Array:
  """Softmax attention with a sink logit per head and/or learned sink tokens.

  Args:
    q, k, v: as `attnjax.ops.dot_product_attention` (GQA by shape).
    sinks: float `[heads]`, a logit per head in the denominator (-inf: no sink).
    sink_k: `[num_sink_tokens, kv_heads, head_dim]`, keys of the learned sink tokens.
    sink_v: `[num_sink_tokens, kv_heads, value_dim]`, their values (given with `sink_k`).
    impl: "reference" | "xla" | "auto".
    **attention_kwargs: `mask`, `segment_ids`, `scale`, `softcap`, `q_offset`, `block_sizes`
      of `dot_product_attention`; mask and segments apply to `k`, never to the sink tokens.

  Returns:
    `[batch, q_len, heads, value_dim]` in q's dtype.
  """
  shape = check_qkv(q, k, v)
  if (sink_k is None) != (sink_v is None):
    raise ValueError("sink_k and sink_v must be given together")
  out, lse = softmax_api.dot_product_attention(
    q, k, v, sinks=sinks, impl=impl, return_lse=True, **attention_kwargs
  )
  if sink_k is None:
    return out
  wanted = (shape.kv_heads, shape.head_dim)
  if sink_k.ndim != 3 or sink_k.shape[1:] != wanted:
    raise ValueError(
      f"sink_k must be [num_sink_tokens, kv_heads, head_dim] = [n, {wanted[0]}, {wanted[1]}], "
      f"got {sink_k.shape}"
    )
  if sink_v.shape != (*sink_k.shape[:2], shape.value_dim):
    raise ValueError(
      f"sink_v must be [num_sink_tokens, kv_heads, value_dim] = {(*sink_k.shape[:2],)} + "
      f"({shape.value_dim},), got {sink_v.shape}"
    )
  sink_kwargs = {
    key: attention_kwargs[key] for key in ("scale", "softcap") if key in attention_kwargs
  }
  sink_part = token_attention(q, sink_k, sink_v, impl=impl, **sink_kwargs)
  return merge_partial_attention((out, lse), sink_part).astype(out.dtype)


def token_attention(q, sink_k, sink_v, *, impl: str = "auto", **kwargs):
  """(out, lse) of `q [batch, q_len, heads, d]` over the sink tokens alone, every one visible.

  `sink_k [n, kv_heads, d]`, `sink_v [n, kv_heads, dv]`; `kwargs`: `scale`, `softcap`.
  """
  batched = [jnp.broadcast_to(t, (q.shape[0], *t.shape)) for t in (sink_k, sink_v)]
  return softmax_api.dot_product_attention(q, *batched, impl=impl, return_lse=True, **kwargs)


def merge_partial_attention(*parts: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Softmax attention over the union of disjoint key sets from per-set `(out, lse)` pairs.

  `out [batch, q_len, heads, dv]`, `lse` float32 `[batch, q_len, heads]` (-inf: no key);
  returns float32 `[batch, q_len, heads, dv]`, zeros where every part is empty.
  """
  lse = functools.reduce(jnp.logaddexp, [part_lse for _, part_lse in parts])
  safe_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  return sum(
    part_out.astype(jnp.float32) * jnp.exp(part_lse - safe_lse)[..., None]
    for part_out, part_lse in parts
  )


def _example(key, *, batch, seq, heads, kv_heads, head_dim):
  q, k, v = registry.random_qkv(
    key, batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim
  )
  k_sinks, k_tokens = jax.random.split(jax.random.fold_in(key, 1))
  sink_k, sink_v = jax.random.normal(k_tokens, (2, 2, kv_heads, head_dim))
  return (q, k, v), {
    "sinks": jax.random.normal(k_sinks, (heads,)),
    "sink_k": sink_k,
    "sink_v": sink_v,
  }


registry.register(
  "sinks",
  sink_attention,
  family="softmax",
  paper="Xiao et al. 2024, Efficient Streaming Language Models with Attention Sinks "
  "(arXiv 2309.17453)",
  description="learned sink logit per head and optional learned sink tokens",
  capabilities=registry.Capabilities(causal=True, mask=True, segment_ids=True),
  impls=tuple(softmax_api.IMPLS),
  defaults={"mask": masks.causal()},
  module="attnjax.nn.softmax_variants:SinkAttention",
  example=_example,
)
