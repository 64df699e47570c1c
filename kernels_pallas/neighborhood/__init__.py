"""Fused Pallas kernels of local (neighborhood) attention over a static tile schedule.

Mosaic TPU (`tpu.py`) and Triton GPU (`gpu.py`), same signature and function; the schedule and
argument checks they share live in `common.py`.
"""

from kernels_pallas.neighborhood.common import TileSchedule
from kernels_pallas.neighborhood.tpu import tile_sparse_attention

__all__ = ["TileSchedule", "tile_sparse_attention"]
