"""Fused Pallas kernel of local (neighborhood) attention over a static tile schedule."""

from kernels_pallas.neighborhood.tpu import TileSchedule, tile_sparse_attention

__all__ = ["TileSchedule", "tile_sparse_attention"]
