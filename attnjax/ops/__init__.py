"""Pure attention ops, one folder per family; importing this package registers all variants."""

from attnjax.ops.softmax import dot_product_attention

__all__ = ["dot_product_attention"]
