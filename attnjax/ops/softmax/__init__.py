"""Softmax attention: dense float32 reference, XLA blockwise (flash) form, mask presets."""

from attnjax.ops.softmax import presets  # noqa: F401  (registers the mask presets)
from attnjax.ops.softmax.api import dot_product_attention
from attnjax.ops.softmax.blockwise import BlockSizes

__all__ = ["BlockSizes", "dot_product_attention"]
