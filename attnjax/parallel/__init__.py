"""Sequence parallelism on `jax.sharding` meshes: ring, all-gather, Ulysses, LASP-2, ZeCO.

Import explicitly (`import attnjax.parallel`); see `api.sequence_parallel`.
"""

from attnjax.parallel.api import sequence_parallel

__all__ = ["sequence_parallel"]
