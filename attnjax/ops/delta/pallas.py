"""`impl="pallas"` / `"pallas_interpret"` of `delta_rule_attention`: the chunk terms in XLA,
the walk over chunks in a kernel.

The terms of every chunk that do not depend on the state entering it (`chunk.chunk_terms`:
batched matmuls and the UT transform's triangular inverse, parallel over chunks) stay in XLA,
which differentiates them; the sequential walk that carries the state is
`kernels_pallas.delta_rule.tpu` (Mosaic) on TPU and `kernels_pallas.delta_rule.gpu` (Triton)
on GPU, each with its backward pass, chosen by `registry.dispatch` for the platform compiled
for. `pallas_interpret` runs the TPU kernel in the Pallas interpreter on any backend (CI:
CPU); `kernel="gpu"` interprets the Triton kernel instead.
"""

from __future__ import annotations

import jax.numpy as jnp

from attnjax.ops.delta import chunk
from kernels_pallas import common
from kernels_pallas.delta_rule import gpu, tpu


def delta_rule_attention(
  q, k, v, beta, *, log_decay, carry, initial_state, scale, chunk_size, interpret, kernel="tpu"
):
  """Same arguments and function as `reference.delta_rule_attention`, plus `interpret` and
  `kernel` ("tpu": Mosaic, "gpu": Triton)."""
  state_pass = tpu.state_pass
  if common.check_kernel(kernel) == "gpu":
    state_pass, chunk_size = gpu.state_pass, gpu.chunk_size(q.shape[3], chunk_size)
  batch, seq, heads, _ = q.shape
  terms = chunk.chunk_terms(q, k, v, beta, log_decay, carry, chunk_size)
  # bfloat16 inputs feed the kernel's matmuls bfloat16 operands; the state stays float32.
  operands = (terms.query_state, terms.w, terms.u, terms.k_end)
  state_out, final_state = state_pass(
    *(x.astype(q.dtype) for x in operands), terms.end_decay, initial_state, interpret=interpret
  )
  out = jnp.einsum("bhnij,bhnjv->bhniv", terms.p, terms.u) + state_out
  out = scale * jnp.moveaxis(out, 1, 3).reshape(batch, -1, heads, out.shape[-1])
  return out[:, :seq], final_state
