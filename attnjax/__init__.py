"""attnjax: attention mechanisms for JAX/Flax behind one calling convention.

import attnjax as aj
out = aj.ops.dot_product_attention(q, k, v, mask=aj.masks.causal())
"""

from attnjax import masks, ops, registry

__all__ = ["masks", "ops", "registry"]
__version__ = "0.1.0"
