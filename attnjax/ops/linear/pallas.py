"""`impl="pallas"` / `"pallas_interpret"` of `linear_attention`: the chunked-linear kernels.

Both kernels (Lightning Attention-2 tiling, every decay kind) compute the same function:
`kernels_pallas.chunked_linear.tpu` (Mosaic) on TPU and `kernels_pallas.chunked_linear.gpu`
(Triton) on GPU. `pallas_interpret` runs the TPU kernel in the Pallas interpreter on any
backend (CI: CPU); `kernel="gpu"` interprets the Triton kernel instead. On other backends
`impl="pallas"` raises `registry.Unsupported`, so `impl="auto"` falls back to "xla".
"""

from __future__ import annotations

import jax

from attnjax import registry
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
  kernel: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Same arguments and function as `reference.linear_attention`, plus `interpret` and
  `kernel` ("tpu" or "gpu"; defaults to the backend's, or "tpu" when interpreting)."""
  kernel = kernel or ("tpu" if interpret else _backend_kernel())
  if kernel == "gpu":
    # Triton tiles are powers of two (>= 16): round the chunk up (the function does not change).
    module, block_sizes = gpu, gpu.BlockSizes(chunk=gpu.power_of_two_tile(chunk_size))
  elif kernel == "tpu":
    # The TPU kernel tiles whole sublanes: round the chunk up to a multiple of them.
    chunk = -(-chunk_size // tpu.CHUNK_MULTIPLE) * tpu.CHUNK_MULTIPLE
    module, block_sizes = tpu, tpu.BlockSizes(chunk=chunk)
  else:
    raise ValueError(f"kernel must be None, 'tpu' or 'gpu', got kernel={kernel!r}")
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


def _backend_kernel() -> str:
  backend = jax.default_backend()
  if backend == "tpu":
    return "tpu"
  if backend in ("gpu", "cuda", "rocm"):
    return "gpu"
  raise registry.Unsupported(
    f"the chunked-linear Pallas kernels target TPU and GPU; backend is {backend!r} "
    "(impl='pallas_interpret' runs the TPU kernel in the interpreter, or use impl='xla')"
  )
