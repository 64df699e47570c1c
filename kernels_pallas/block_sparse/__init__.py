"""Block-sparse flash attention kernels: Mosaic TPU (`tpu.py`), Triton GPU (`gpu.py`).

Shared pieces (block sizes, tile lists, argument checks) live in `common.py`.
"""

from kernels_pallas.block_sparse.common import BlockSizes, MaskInfo
from kernels_pallas.block_sparse.tpu import block_sparse_attention

__all__ = ["BlockSizes", "MaskInfo", "block_sparse_attention"]
