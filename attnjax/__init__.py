"""attnjax: attention mechanisms for JAX/Flax behind one calling convention.

import attnjax as aj
out = aj.ops.dot_product_attention(q, k, v, mask=aj.masks.causal())

`aj.masks`, `aj.ops` and `aj.registry` load with the package; `aj.nn` (Flax NNX modules),
`aj.parallel` (sequence parallelism) and `aj.analysis` (attention maps, heads) load on first
use, so `import attnjax` does not pay for Flax.
"""

import importlib

from attnjax import masks, ops, registry

__all__ = ["analysis", "masks", "nn", "ops", "parallel", "registry"]
__version__ = "0.1.0"

_LAZY = ("analysis", "nn", "parallel")


def __getattr__(name: str):
  if name in _LAZY:
    return importlib.import_module(f"attnjax.{name}")
  raise AttributeError(f"module 'attnjax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))
