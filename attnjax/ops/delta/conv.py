"""The causal depthwise short convolution that DeltaNet and Gated DeltaNet apply to q, k and v
after their projections (Yang et al. 2024, arXiv 2406.06484, Sec. 3.3; kernel width 4 in the
authors' code), as a pure function that does not reach across document starts."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.ops.delta.api import document_carry


def short_convolution(x: jax.Array, weight: jax.Array, segment_ids=None) -> jax.Array:
  """`y_t = sum_i weight[i] * x_{t - i}` over the `width` latest tokens of t's document.

  Args:
    x: `[batch, seq, channels]`.
    weight: `[width, channels]`; `weight[0]` multiplies the current token.
    segment_ids: int `[batch, seq]` or None; taps before a document's start read zeros.

  Returns:
    `[batch, seq, channels]` in x's dtype.
  """
  if x.ndim != 3 or weight.ndim != 2 or weight.shape[1] != x.shape[2]:
    raise ValueError(
      f"x must be [batch, seq, channels] and weight [width, channels]; got x {x.shape}, "
      f"weight {weight.shape}"
    )
  batch, seq, _ = x.shape
  carry = document_carry(segment_ids, batch, seq)
  run = jnp.zeros((batch, seq), jnp.int32) if carry is None else jnp.cumsum(~carry, axis=1)
  out = jnp.zeros(x.shape, jnp.float32)
  for lag in range(min(weight.shape[0], seq)):
    shifted = jnp.pad(x, [(0, 0), (lag, 0), (0, 0)])[:, :seq]
    same_doc = run == jnp.pad(run, [(0, 0), (lag, 0)], constant_values=-1)[:, :seq]
    out = out + jnp.where(same_doc[..., None], shifted * weight[lag], 0.0)
  return out.astype(x.dtype)
