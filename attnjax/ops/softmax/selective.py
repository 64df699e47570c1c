"""Selective attention (Zhang et al. 2024, "Selective Attention: Enhancing Transformer through
Principled Context Control", NeurIPS 2024, arXiv 2411.12892).

Selective self-attention scales each query by an inverse temperature and each value by a
value temperature before ordinary softmax attention:

    out_i = sum_j softmax_j(tau_q(i) * q_i . k_j * scale + mask) * tau_v(j) * v_j

`tau_q` depends on the query embedding (token-aware) and on the query's position (position-
aware: a longer context needs a larger inverse temperature to stay equally sparse, the
paper's log-of-length law); `tau_v` lets a token damp its own value. The op takes both
temperatures; the NNX mixer computes them from weights shared with the query and value
projections (positions i from 0, q_i before rotary):

    tau_q(i) = 1 + sigmoid(a_h) log(i + 1) + tanh(u_h . q_i),   tau_v(j) = 1 + tanh(w_h . v_j)

Interpretation: the released code shows the positional term `1 + c log(n)` with `c` in
(0, 1); the additive combination with the token term and the tanh forms are this library's
reading of the paper's weight-shared temperature functions.
"""

from __future__ import annotations

import jax

from attnjax import masks, registry
from attnjax.ops.qkv import check_qkv
from attnjax.ops.softmax import api as softmax_api


def selective_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_temp: jax.Array,
  v_temp: jax.Array | None = None,
  *,
  impl: str = "auto",
  **attention_kwargs,
) -> jax.Array:
  """`dot_product_attention(q_temp * q, k, v_temp * v, ...)` over `[batch, seq, heads, dim]`.

  Args:
    q, k, v: as `attnjax.ops.dot_product_attention` (GQA by shape).
    q_temp: `[batch, q_len, heads, 1]`, inverse temperature of each query's logits.
    v_temp: `[batch, kv_len, kv_heads, 1]`, scale of each value, or None (no value scaling).
    impl: implementation of the attention, "reference" | "xla" | "pallas" | "auto".
    **attention_kwargs: `mask`, `segment_ids`, `scale`, `softcap`, `sinks`, `q_offset`,
      `block_sizes` of `dot_product_attention`.

  Returns:
    `[batch, q_len, heads, value_dim]` in q's dtype.
  """
  shape = check_qkv(q, k, v)
  wanted_q = (shape.batch, shape.q_len, shape.heads, 1)
  if q_temp.shape != wanted_q:
    raise ValueError(f"q_temp must be [batch, q_len, heads, 1] = {wanted_q}, got {q_temp.shape}")
  wanted_v = (shape.batch, shape.kv_len, shape.kv_heads, 1)
  if v_temp is not None and v_temp.shape != wanted_v:
    raise ValueError(
      f"v_temp must be [batch, kv_len, kv_heads, 1] = {wanted_v} or None, got {v_temp.shape}"
    )
  q = (q * q_temp).astype(q.dtype)
  if v_temp is not None:
    v = (v * v_temp).astype(v.dtype)
  return softmax_api.dot_product_attention(q, k, v, impl=impl, **attention_kwargs)


def _example(key, *, batch, seq, heads, kv_heads, head_dim):
  q, k, v = registry.random_qkv(
    key, batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim
  )
  k_q, k_v = jax.random.split(jax.random.fold_in(key, 1))
  q_temp = jax.nn.softplus(jax.random.normal(k_q, (batch, seq, heads, 1)))
  v_temp = jax.nn.sigmoid(jax.random.normal(k_v, (batch, seq, kv_heads, 1)))
  return (q, k, v, q_temp, v_temp), {}


registry.register(
  "selective",
  selective_attention,
  family="softmax",
  paper="Zhang et al. 2024, Selective Attention: Enhancing Transformer through Principled "
  "Context Control (arXiv 2411.12892)",
  description="query temperature from the query and its position; per-token value scale",
  capabilities=registry.Capabilities(causal=True, mask=True, segment_ids=True, lse=True),
  impls=tuple(softmax_api.IMPLS),
  defaults={"mask": masks.causal()},
  module="attnjax.nn.softmax_variants:SelectiveAttention",
  example=_example,
)
