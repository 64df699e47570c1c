"""Mask presets of `dot_product_attention`, registered as variants for models and configs.

Each preset is `dot_product_attention` with a mask built from the preset's own options by a
mask builder (`causal_mask`, `sliding_window_mask`, ...). `MASK_PRESETS` maps each preset op
to its builder, so code that must see the mask itself (ring and all-gather sequence
parallelism shift it per chunk) can turn a preset call into a plain `dot_product_attention`
call: `preset_call(op, kwargs)`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from attnjax import masks, registry
from attnjax.ops.softmax import api

_CAPABILITIES = frozenset({"mask", "segment_ids", "gqa", "lse", "softcap", "sinks"})
_MODULE = "attnjax.nn.attention:Attention"


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


def causal_attention(q, k, v, *, impl="auto", **kwargs):
  """Causal softmax attention (Vaswani et al. 2017), `[batch, seq, heads, dim]`."""
  return api.dot_product_attention(q, k, v, mask=causal_mask(), impl=impl, **kwargs)


def sliding_window_attention(q, k, v, *, window: int = 256, impl="auto", **kwargs):
  """Causal attention over the last `window` keys, the query included (Longformer/Mistral)."""
  mask = sliding_window_mask(window)
  return api.dot_product_attention(q, k, v, mask=mask, impl=impl, **kwargs)


def chunked_attention(q, k, v, *, chunk_size: int = 256, impl="auto", **kwargs):
  """Causal attention within chunks of `chunk_size` positions (Llama 4 local layers)."""
  mask = chunked_mask(chunk_size)
  return api.dot_product_attention(q, k, v, mask=mask, impl=impl, **kwargs)


def prefix_lm_attention(q, k, v, *, prefix_len: int = 0, impl="auto", **kwargs):
  """Bidirectional over the first `prefix_len` positions, causal after (Raffel et al. 2020)."""
  mask = prefix_lm_mask(prefix_len)
  return api.dot_product_attention(q, k, v, mask=mask, impl=impl, **kwargs)


# Preset op -> the builder of its mask from the preset's options.
MASK_PRESETS: dict[Callable, Callable[..., masks.Mask]] = {
  causal_attention: causal_mask,
  sliding_window_attention: sliding_window_mask,
  chunked_attention: chunked_mask,
  prefix_lm_attention: prefix_lm_mask,
}


def preset_call(op: Callable, kwargs: dict) -> dict:
  """The `dot_product_attention` keywords of the call `op(q, k, v, **kwargs)` of a preset op.

  The preset's options (e.g. `window`) become `mask=`; the other keywords pass through.
  """
  make_mask = MASK_PRESETS[op]
  if "mask" in kwargs:
    raise TypeError(f"{op.__name__} fixes its own mask and takes no mask= argument")
  names = inspect.signature(make_mask).parameters
  mask_options = {name: value for name, value in kwargs.items() if name in names}
  rest = {name: value for name, value in kwargs.items() if name not in names}
  return {**rest, "mask": make_mask(**mask_options)}


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
