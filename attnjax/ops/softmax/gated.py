"""Gated attention (Qiu et al. 2025, "Gated Attention for Large Language Models: Non-linearity,
Sparsity, and Attention-Sink-Free", arXiv 2505.06708).

The paper's best variant gates the output of scaled dot-product attention per head, after SDPA
and before the output projection (its position G1), with a sigmoid of the layer input:

    Y  = softmax(q k^T * scale + mask) v           (per head, [batch, seq, heads, dv])
    Y' = Y * sigmoid(X W_theta)                     (multiplicative, head-specific)
    out = Y' W_O                                    (the mixer's output projection)

with X the hidden states entering the layer (after its pre-norm). `elementwise`: W_theta
`[embed, heads * dv]`, one gate per channel; `headwise`: W_theta `[embed, heads]`, one scalar
per head and token. The op takes the gate values `sigmoid(X W_theta)`; the NNX mixer computes
them, without a bias (interpretation). The paper's other gate positions and activations are
its ablations and are not implemented.
"""

from __future__ import annotations

import jax

from attnjax import masks, registry
from attnjax.ops.qkv import check_qkv
from attnjax.ops.softmax import api as softmax_api


def gated_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  gate: jax.Array,
  *,
  impl: str = "auto",
  **attention_kwargs,
) -> jax.Array:
  """`gate * dot_product_attention(q, k, v, ...)` over `[batch, seq, heads, dim]`.

  Args:
    q, k, v: as `attnjax.ops.dot_product_attention` (GQA by shape).
    gate: `[batch, q_len, heads, 1]` (headwise) or `[batch, q_len, heads, value_dim]`
      (elementwise), usually `sigmoid(x W_gate)` in (0, 1).
    impl: implementation of the attention, "reference" | "xla" | "auto".
    **attention_kwargs: `mask`, `segment_ids`, `scale`, `softcap`, `sinks`, `q_offset`,
      `block_sizes` of `dot_product_attention`.

  Returns:
    `[batch, q_len, heads, value_dim]` in q's dtype.
  """
  shape = check_qkv(q, k, v)
  wanted = (shape.batch, shape.q_len, shape.heads)
  if gate.ndim != 4 or gate.shape[:3] != wanted or gate.shape[3] not in (1, shape.value_dim):
    raise ValueError(
      f"gate must be [batch, q_len, heads, 1 or value_dim] = {wanted} + (1 or "
      f"{shape.value_dim},), got {gate.shape}"
    )
  out = softmax_api.dot_product_attention(q, k, v, impl=impl, **attention_kwargs)
  return (out * gate).astype(out.dtype)


def _example(key, *, batch, seq, heads, kv_heads, head_dim):
  q, k, v = registry.random_qkv(
    key, batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim
  )
  gate = jax.nn.sigmoid(jax.random.normal(jax.random.fold_in(key, 1), (batch, seq, heads, 1)))
  return (q, k, v, gate), {}


registry.register(
  "gated",
  gated_attention,
  family="softmax",
  paper="Qiu et al. 2025, Gated Attention for Large Language Models (arXiv 2505.06708)",
  description="sigmoid gate from the layer input on the attention output, per head or channel",
  capabilities=registry.Capabilities(causal=True, mask=True, segment_ids=True),
  impls=tuple(softmax_api.IMPLS),
  defaults={"mask": masks.causal()},
  module="attnjax.nn.softmax_variants:GatedAttention",
  example=_example,
)
