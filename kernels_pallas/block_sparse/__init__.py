"""Block-sparse flash attention kernels: `tpu` (Mosaic) and `gpu` (Triton), one signature.

Each module's `block_sparse_attention` equals `attnjax.ops.softmax.reference.attention` on the
mask a `MaskInfo` encodes; block sizes, tile lists and argument checks are shared (`common.py`).
"""

from kernels_pallas.block_sparse import gpu, tpu
from kernels_pallas.block_sparse.common import BlockSizes, MaskInfo

__all__ = ["BlockSizes", "MaskInfo", "gpu", "tpu"]
