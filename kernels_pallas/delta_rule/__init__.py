"""Delta-rule state-pass kernels: `tpu` (Mosaic) and `gpu` (Triton), one signature; argument
checks are shared (`common.py`).

The chunked delta rule (`attnjax.ops.delta.chunk`) splits into terms of each chunk that do not
depend on the state entering it (batched matmuls and a triangular inverse, parallel over
chunks, left to XLA) and the walk over chunks that carries the state. The kernels are that walk,
forward and backward, with the state resident on chip.
"""

from kernels_pallas.delta_rule import gpu, tpu

__all__ = ["gpu", "tpu"]
