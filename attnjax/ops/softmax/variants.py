"""Mask presets of `dot_product_attention`, registered as variants for models and configs."""

from __future__ import annotations

import functools

from attnjax import masks, registry
from attnjax.ops.softmax import api

_CAPABILITIES = frozenset({"mask", "segment_ids", "gqa", "lse", "softcap", "sinks"})
_MODULE = "attnjax.nn.attention:Attention"


def causal_attention(q, k, v, *, impl="auto", **kwargs):
  """Causal softmax attention (Vaswani et al. 2017), `[batch, seq, heads, dim]`."""
  return api.dot_product_attention(q, k, v, mask=masks.causal(), impl=impl, **kwargs)


def sliding_window_attention(q, k, v, *, window: int = 256, impl="auto", **kwargs):
  """Causal attention over the last `window` keys, the query included (Longformer/Mistral)."""
  if window < 1:
    raise ValueError(f"window must be >= 1, got window={window}")
  mask = masks.sliding_window(window - 1)
  return api.dot_product_attention(q, k, v, mask=mask, impl=impl, **kwargs)


def chunked_attention(q, k, v, *, chunk_size: int = 256, impl="auto", **kwargs):
  """Causal attention within chunks of `chunk_size` positions (Llama 4 local layers)."""
  mask = masks.causal() & masks.chunked(chunk_size)
  return api.dot_product_attention(q, k, v, mask=mask, impl=impl, **kwargs)


def prefix_lm_attention(q, k, v, *, prefix_len: int = 0, impl="auto", **kwargs):
  """Bidirectional over the first `prefix_len` positions, causal after (Raffel et al. 2020)."""
  return api.dot_product_attention(q, k, v, mask=masks.prefix_lm(prefix_len), impl=impl, **kwargs)


def _register(name, op, paper, description):
  registry.register(
    registry.Variant(
      name=name,
      family="softmax",
      paper=paper,
      reference=functools.partial(op, impl="reference"),
      impls={impl: functools.partial(op, impl=impl) for impl in api.IMPLS},
      op=op,
      module=_MODULE,
      capabilities=_CAPABILITIES,
      description=description,
    )
  )


_register(
  "softmax",
  causal_attention,
  "Vaswani et al. 2017, Attention Is All You Need",
  "causal softmax attention",
)
_register(
  "sliding_window",
  sliding_window_attention,
  "Beltagy et al. 2020, Longformer",
  "causal softmax over the last `window` keys",
)
_register(
  "chunked",
  chunked_attention,
  "Meta 2025, Llama 4 (chunked local attention)",
  "causal softmax within chunks of `chunk_size`",
)
_register(
  "prefix_lm",
  prefix_lm_attention,
  "Raffel et al. 2020, T5 (prefix LM)",
  "bidirectional prefix of `prefix_len`, causal after",
)
