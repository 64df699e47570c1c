"""`impl="pallas"` / `"pallas_interpret"` of `linear_attention`: the chunked-linear kernels.

Both kernels (Lightning Attention-2 tiling, every decay kind) compute the same function:
`kernels_pallas.chunked_linear.tpu` (Mosaic) on TPU and `kernels_pallas.chunked_linear.gpu`
(Triton) on GPU; `registry.dispatch` picks the one of the platform the program is compiled
for. `pallas_interpret` runs the TPU kernel in the Pallas interpreter on any backend (CI: CPU);
`kernel="gpu"` interprets the Triton kernel instead.
"""

from __future__ import annotations

import jax

from kernels_pallas import common, triton
from kernels_pallas.chunked_linear import gpu, tpu


def linear_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  log_decay: jax.Array,
  initial_state: jax.Array,
  causal: bool,
  chunk_size: int,
  interpret: bool,
  kernel: str = "tpu",
) -> tuple[jax.Array, jax.Array]:
  """Same arguments and function as `reference.linear_attention`, plus `interpret` and
  `kernel` ("tpu": Mosaic, "gpu": Triton)."""
  if common.check_kernel(kernel) == "gpu":
    # Triton tiles are powers of two (>= 16): round the chunk up (the function does not change).
    chunk = common.next_power_of_two(chunk_size, at_least=triton.MIN_DOT)
    module, block_sizes = gpu, gpu.default_block_sizes(q.shape[3], chunk)
  else:
    # At least tpu.MIN_CHUNK tokens (the MXU's width), in whole sublanes.
    chunk = -(-max(chunk_size, tpu.MIN_CHUNK) // tpu.CHUNK_MULTIPLE) * tpu.CHUNK_MULTIPLE
    module, block_sizes = tpu, tpu.BlockSizes(chunk=chunk)
  return module.linear_attention(
    q,
    k,
    v,
    log_decay=log_decay,
    initial_state=initial_state,
    causal=causal,
    block_sizes=block_sizes,
    interpret=interpret,
  )
