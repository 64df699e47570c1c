"""Chunked linear attention kernels (Lightning Attention-2 tiling): `tpu` (Mosaic) and `gpu`
(Triton), one signature; each has its `BlockSizes`, argument checks are shared (`common.py`).

Each module's `linear_attention` equals `attnjax.ops.linear.reference.linear_attention`.
"""

from kernels_pallas.chunked_linear import gpu, tpu

__all__ = ["gpu", "tpu"]
