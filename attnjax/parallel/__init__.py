"""Sequence parallelism on `jax.sharding` meshes: ring, all-gather, Ulysses, LASP-2, ZeCO.

Import explicitly (`import attnjax.parallel`); see `api.sequence_parallel` and, for the ring's
zigzag layout, `layout`.
"""

from attnjax.parallel.api import sequence_parallel
from attnjax.parallel.layout import from_zigzag, to_zigzag

__all__ = ["from_zigzag", "sequence_parallel", "to_zigzag"]
