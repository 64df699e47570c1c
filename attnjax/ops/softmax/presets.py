"""Mask presets of `dot_product_attention`, registered as variants for models and configs.

Each preset is `dot_product_attention` with a mask built from the preset's own options by a
mask builder (`causal_mask`, `sliding_window_mask`, ...). Its registration's `preset` turns a
call's keywords into plain `dot_product_attention` keywords (the options become `mask=`), so
code that must see the mask itself (ring and all-gather sequence parallelism shift it per
chunk) runs the base op.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from attnjax import masks, registry
from attnjax.ops.softmax import api


def causal_mask() -> masks.Mask:
  """Each query sees the keys at or before its position."""
  return masks.causal()


def sliding_window_mask(window: int = 256) -> masks.Mask:
  """Causal over the last `window` keys, the query included."""
  if window < 1:
    raise ValueError(f"window must be >= 1, got window={window}")
  return masks.sliding_window(window - 1)


def chunked_mask(chunk_size: int = 256) -> masks.Mask:
  """Causal within chunks of `chunk_size` positions."""
  return masks.causal() & masks.chunked(chunk_size)


def prefix_lm_mask(prefix_len: int = 0) -> masks.Mask:
  """Bidirectional over the first `prefix_len` positions, causal after."""
  return masks.prefix_lm(prefix_len)


def mask_keywords(make_mask: Callable[..., masks.Mask], kwargs: dict, heads: int) -> dict:
  """`dot_product_attention` keywords of a preset call: its options become `mask=`.

  `heads` (the query heads) is unused: mask presets do not depend on it.
  """
  del heads
  if "mask" in kwargs:
    raise TypeError("a mask preset fixes its own mask and takes no mask= argument")
  names = inspect.signature(make_mask).parameters
  mask_options = {name: value for name, value in kwargs.items() if name in names}
  rest = {name: value for name, value in kwargs.items() if name not in names}
  return {**rest, "mask": make_mask(**mask_options)}


def causal_attention(q, k, v, *, impl="auto", **kwargs):
  """Causal softmax attention (Vaswani et al. 2017), `[batch, seq, heads, dim]`."""
  return api.dot_product_attention(q, k, v, impl=impl, **mask_keywords(causal_mask, kwargs, 0))


def sliding_window_attention(q, k, v, *, window: int = 256, impl="auto", **kwargs):
  """Causal attention over the last `window` keys, the query included (Longformer/Mistral)."""
  keywords = mask_keywords(sliding_window_mask, {**kwargs, "window": window}, 0)
  return api.dot_product_attention(q, k, v, impl=impl, **keywords)


def chunked_attention(q, k, v, *, chunk_size: int = 256, impl="auto", **kwargs):
  """Causal attention within chunks of `chunk_size` positions (Llama 4 local layers)."""
  keywords = mask_keywords(chunked_mask, {**kwargs, "chunk_size": chunk_size}, 0)
  return api.dot_product_attention(q, k, v, impl=impl, **keywords)


def prefix_lm_attention(q, k, v, *, prefix_len: int = 0, impl="auto", **kwargs):
  """Bidirectional over the first `prefix_len` positions, causal after (Raffel et al. 2020)."""
  keywords = mask_keywords(prefix_lm_mask, {**kwargs, "prefix_len": prefix_len}, 0)
  return api.dot_product_attention(q, k, v, impl=impl, **keywords)


_CAPABILITIES = registry.Capabilities(causal=True, segment_ids=True, lse=True, split="mask")


def _register(name, op, make_mask, paper, description, **example_options):
  registry.register(
    name,
    op,
    family="softmax",
    paper=paper,
    description=description,
    capabilities=_CAPABILITIES,
    impls=tuple(api.IMPLS),
    preset=functools.partial(mask_keywords, make_mask),
    module="attnjax.nn.attention:Attention",
    example=lambda key, **sizes: (registry.random_qkv(key, **sizes), dict(example_options)),
  )


_register(
  "softmax",
  causal_attention,
  causal_mask,
  "Vaswani et al. 2017, Attention Is All You Need",
  "causal softmax attention",
)
_register(
  "sliding_window",
  sliding_window_attention,
  sliding_window_mask,
  "Beltagy et al. 2020, Longformer",
  "causal softmax over the last `window` keys",
  window=5,
)
_register(
  "chunked",
  chunked_attention,
  chunked_mask,
  "Meta 2025, Llama 4 (chunked local attention)",
  "causal softmax within chunks of `chunk_size`",
  chunk_size=7,
)
_register(
  "prefix_lm",
  prefix_lm_attention,
  prefix_lm_mask,
  "Raffel et al. 2020, T5 (prefix LM)",
  "bidirectional prefix of `prefix_len`, causal after",
)
