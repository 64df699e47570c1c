"""`impl="pallas"` / `"pallas_interpret"` of `linear_attention`: the chunked-linear kernel.

The kernel (`kernels_pallas.chunked_linear.tpu`, Lightning Attention-2 tiling) handles every
decay kind. It is written for TPU: on other backends `impl="pallas"` raises
`registry.Unsupported`, so `impl="auto"` falls back to "xla" (there is no GPU kernel yet).
"""

from __future__ import annotations

import jax

from attnjax import registry
from kernels_pallas.chunked_linear import tpu


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
) -> tuple[jax.Array, jax.Array]:
  """Same arguments and function as `reference.linear_attention`, plus `interpret`."""
  if not interpret and jax.default_backend() != "tpu":
    raise registry.Unsupported(
      f"the chunked-linear Pallas kernel is written for TPU (backend is "
      f"{jax.default_backend()!r}); use impl='pallas_interpret' or 'xla'"
    )
  # The kernel tiles whole sublanes: round the chunk up (the function does not change).
  chunk = -(-chunk_size // tpu.CHUNK_MULTIPLE) * tpu.CHUNK_MULTIPLE
  return tpu.linear_attention(
    q,
    k,
    v,
    log_decay=log_decay,
    initial_state=initial_state,
    causal=causal,
    block_sizes=tpu.BlockSizes(chunk=chunk),
    interpret=interpret,
  )
