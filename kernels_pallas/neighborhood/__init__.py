"""Fused Pallas kernels of local (neighborhood) attention over a static tile schedule.

`tpu` (Mosaic) and `gpu` (Triton), same signature and function: each module's
`tile_sparse_attention` equals `attnjax.ops.neighborhood.reference.attention` on the windows
its `TileSchedule` encodes; the schedule and argument checks are shared (`common.py`).
"""

from kernels_pallas.neighborhood import gpu, tpu
from kernels_pallas.neighborhood.common import TileSchedule

__all__ = ["TileSchedule", "gpu", "tpu"]
