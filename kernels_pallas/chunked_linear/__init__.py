"""Chunked linear attention kernels (Lightning Attention-2 tiling): Mosaic TPU (`tpu.py`) and
Triton GPU (`gpu.py`), one signature; shared argument checks in `common.py`."""

from kernels_pallas.chunked_linear import gpu
from kernels_pallas.chunked_linear.tpu import BlockSizes, linear_attention

__all__ = ["BlockSizes", "gpu", "linear_attention"]
