"""DiffQKV attention (Lin et al. 2025, "Sigma: Differential Rescaling of Query, Key and Value
for Efficient Language Models", arXiv 2501.13629).

Differentially compressed KV: fewer K heads than V heads (`n_k | n_v | n_q`), and a K head
dimension that need not equal V's. Query head i reads K head `i // (n_q / n_k)` and V head
`i // (n_q / n_v)`:

    out_i = softmax(q_i k_{i // g_k}^T / sqrt(d_k) + mask) v_{i // g_v}

With `n_k == n_v` this is grouped-query attention. Every K head serves `n_v / n_k` V heads, so
the op repeats the K heads to the V heads' count and runs `dot_product_attention`. Sigma's
augmented Q (a Q head wider than the K head) lives in the mixer's Q projection and does not
change this op; the mixer maps the wide Q head to the key dimension with a per-head linear map
(interpretation: the paper specifies the wider Q head, not the form of that map). Selective V
cache fetching, an inference optimization, is not implemented.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax import masks, registry
from attnjax.ops.softmax import api as softmax_api


def diffqkv_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  impl: str = "auto",
  **attention_kwargs,
) -> jax.Array:
  """Softmax attention with separate K and V head groupings.

  Args:
    q: `[batch, q_len, q_heads, key_dim]`.
    k: `[batch, kv_len, k_heads, key_dim]`, `v_heads % k_heads == 0`.
    v: `[batch, kv_len, v_heads, value_dim]`, `q_heads % v_heads == 0`.
    impl: "reference" | "xla" | "auto".
    **attention_kwargs: `mask`, `segment_ids`, `scale`, `softcap`, `sinks`, `q_offset`,
      `block_sizes` of `dot_product_attention` (scale None: `key_dim ** -0.5`).

  Returns:
    `[batch, q_len, q_heads, value_dim]` in q's dtype.
  """
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [batch, seq, heads, dim], got shape {x.shape}")
  if k.shape[:2] != v.shape[:2] or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
    raise ValueError(
      f"k must be [batch={q.shape[0]}, kv_len, k_heads, key_dim={q.shape[3]}] and v "
      f"[batch, kv_len, v_heads, value_dim] with k's batch and kv_len, got q {q.shape}, "
      f"k {k.shape}, v {v.shape}"
    )
  k_heads, v_heads = k.shape[2], v.shape[2]
  if v_heads % k_heads or q.shape[2] % v_heads:
    raise ValueError(
      f"head counts must nest, k_heads | v_heads | q_heads: got k_heads={k_heads} (k "
      f"{k.shape}), v_heads={v_heads} (v {v.shape}), q_heads={q.shape[2]} (q {q.shape})"
    )
  k = jnp.repeat(k, v_heads // k_heads, axis=2)
  return softmax_api.dot_product_attention(q, k, v, impl=impl, **attention_kwargs)


def _example(key, *, batch, seq, heads, kv_heads, head_dim):
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (batch, seq, heads, head_dim))
  k = jax.random.normal(kk, (batch, seq, 1, head_dim))
  v = jax.random.normal(kv, (batch, seq, kv_heads, head_dim + 2))
  return (q, k, v), {}


registry.register(
  "diffqkv",
  diffqkv_attention,
  family="softmax",
  paper="Lin et al. 2025, Sigma: Differential Rescaling of Query, Key and Value for "
  "Efficient Language Models (arXiv 2501.13629)",
  description="fewer K heads than V heads, K/V head dims apart, augmented Q projection",
  capabilities=registry.Capabilities(causal=True, mask=True, segment_ids=True, lse=True),
  impls=tuple(softmax_api.IMPLS),
  defaults={"mask": masks.causal()},
  module="attnjax.nn.softmax_variants:DiffQKVAttention",
  example=_example,
)
