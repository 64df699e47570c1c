"""Chunked linear attention kernels (Lightning Attention-2 tiling)."""

from kernels_pallas.chunked_linear.tpu import BlockSizes, linear_attention

__all__ = ["BlockSizes", "linear_attention"]
