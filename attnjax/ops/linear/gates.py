"""Output norms and gates of the gated linear-attention layers, as pure functions.

Each paper defines its layer as the attention op followed by a normalization of every token's
output and a multiplicative gate computed from the layer's input; the NNX mixers of
`attnjax.nn.linear` own the gate projections and call these functions. `o` is the op's output
`[batch, seq, heads, value_dim]`, the gate has the same shape; the result goes to `W_O`.

- RetNet's gated multi-scale retention (Sun et al. 2023, arXiv 2307.08621, Sec. 2.2):
  `swish(X W_G) * GroupNorm_h(Y)` -> `group_norm_swish_gate`.
- The GLA Transformer's layer (Yang et al. 2024, arXiv 2312.06635, Sec. 4.4):
  `swish(X W_r + b_r) * LN(O)`, LN over each head -> `group_norm_swish_gate`.
- TransNormerLLM's gated linear attention (Qin et al. 2023, arXiv 2307.14995, Sec. 3.1):
  `SRMSNorm(O) * U` with `U = X W_u` (no activation on `U`) -> `srms_norm_gate`.

RetNet's GroupNorm with one group per head and GLA's per-head LayerNorm are the same function;
both are used without affine parameters, as in the authors' code (the gate and `W_O` follow).
TransNormerLLM's SRMSNorm normalizes the concatenated heads (`[heads * value_dim]`), as its
authors' code applies it to the layer's whole output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Norm epsilons of the authors' code: PyTorch GroupNorm / LayerNorm (RetNet, GLA) and
# TransNormerLLM's SimpleRMSNorm.
GROUP_NORM_EPS = 1e-5
SRMS_NORM_EPS = 1e-6


def group_norm(x: jax.Array, *, eps: float = GROUP_NORM_EPS) -> jax.Array:
  """GroupNorm with one group per head, no affine: `x [..., heads, dim]` -> same shape.

  Each head's `dim` channels are shifted to zero mean and divided by `sqrt(var + eps)`;
  computed in float32, returned in x's dtype.
  """
  x32 = x.astype(jnp.float32)
  centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  variance = jnp.mean(centered * centered, axis=-1, keepdims=True)
  return (centered * jax.lax.rsqrt(variance + eps)).astype(x.dtype)


def srms_norm(x: jax.Array, *, eps: float = SRMS_NORM_EPS) -> jax.Array:
  """TransNormerLLM's SRMSNorm over all heads: `x [..., heads, dim]` -> same shape.

  `x / sqrt(mean(x^2) + eps)` with the mean over the `heads * dim` channels of each token (no
  learned scale); computed in float32, returned in x's dtype.
  """
  x32 = x.astype(jnp.float32)
  mean_square = jnp.mean(x32 * x32, axis=(-2, -1), keepdims=True)
  return (x32 * jax.lax.rsqrt(mean_square + eps)).astype(x.dtype)


def _check_gate(o: jax.Array, gate: jax.Array, name: str) -> None:
  if o.ndim != 4 or gate.shape != o.shape:
    raise ValueError(
      f"o must be [batch, seq, heads, value_dim] and {name} the same shape; got o {o.shape}, "
      f"{name} {gate.shape}"
    )


def group_norm_swish_gate(
  o: jax.Array, gate_logits: jax.Array, *, eps: float = GROUP_NORM_EPS
) -> jax.Array:
  """`swish(gate_logits) * group_norm(o)`: the output of RetNet's and GLA's layers.

  Args:
    o: the op's output `[batch, seq, heads, value_dim]`.
    gate_logits: `X W_G` (RetNet) or `X W_r + b_r` (GLA), same shape as `o`.
    eps: the norm's epsilon.

  Returns:
    `[batch, seq, heads, value_dim]` in o's dtype.
  """
  _check_gate(o, gate_logits, "gate_logits")
  gate = jax.nn.silu(gate_logits.astype(jnp.float32))
  return (group_norm(o.astype(jnp.float32), eps=eps) * gate).astype(o.dtype)


def srms_norm_gate(o: jax.Array, gate: jax.Array, *, eps: float = SRMS_NORM_EPS) -> jax.Array:
  """`srms_norm(o) * gate`: the output of TransNormerLLM's gated linear attention.

  Args:
    o: the op's output `[batch, seq, heads, value_dim]`.
    gate: `U = X W_u`, same shape as `o` (used as is: the paper's gate has no activation).
    eps: the norm's epsilon.

  Returns:
    `[batch, seq, heads, value_dim]` in o's dtype.
  """
  _check_gate(o, gate, "gate")
  normed = srms_norm(o.astype(jnp.float32), eps=eps)
  return (normed * gate.astype(jnp.float32)).astype(o.dtype)
