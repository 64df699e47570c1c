"""Flow attention (Wu et al. 2022, "Flowformer: Linearizing Transformers with Conservation
Flows", ICML): linear attention normalized by flow conservation.

With `phi = sigmoid`, queries are sinks and keys are sources. Using means over the visible
tokens (all tokens, or the prefix `<= i` when causal):

    incoming  I_i = phi(q_i) . mean_j phi(k_j)          outgoing  O_j = phi(k_j) . mean_i phi(q_i)
    conserved incoming  I^_i = phi(q_i) . mean_j (phi(k_j) / O_j)     -> allocation sigmoid(I^_i)
    conserved outgoing  O^_j = phi(k_j) . mean_i (phi(q_i) / I_i)     -> competition
    competition  c_j = exp(O^_j) / mean_j' exp(O^_j')   (O^ clipped to [-1, 1], as Flowformer)
    out_i = sigmoid(I^_i) * sum_j (phi(q_i) . phi(k_j)) c_j v_j / sum_j phi(q_i) . phi(k_j)

The last line is normalized linear attention of (phi(q), phi(k), c * v), computed by
`linear_attention`; the flow statistics are prefix (or total) means, linear in T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.ops.common import check_qkv
from attnjax.ops.linear import api

# Guards the flow divisions as Flowformer does; sigmoid features are positive anyway.
_EPS = 1e-6


def _mean_over_visible(x: jax.Array, causal: bool) -> jax.Array:
  """`[b, t, ...]` -> mean over positions `<= i` (causal) or over all positions, same shape."""
  if not causal:
    return jnp.broadcast_to(jnp.mean(x, axis=1, keepdims=True), x.shape)
  counts = jnp.arange(1, x.shape[1] + 1, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 2)))
  return jnp.cumsum(x, axis=1) / counts


def flow_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  causal: bool = True,
  chunk_size: int = 64,
  impl: str = "auto",
) -> jax.Array:
  """`q [b, t, h, d]`, `k [b, t, hk, d]`, `v [b, t, hk, dv]` -> `[b, t, h, dv]`."""
  shape = check_qkv(q, k, v, same_length=True)
  phi_q = jax.nn.sigmoid(q.astype(jnp.float32))
  phi_k = jnp.repeat(jax.nn.sigmoid(k.astype(jnp.float32)), shape.groups, axis=2)
  values = jnp.repeat(v.astype(jnp.float32), shape.groups, axis=2)
  incoming = jnp.sum(phi_q * _mean_over_visible(phi_k, causal), axis=-1) + _EPS  # [b, t, h]
  outgoing = jnp.sum(phi_k * _mean_over_visible(phi_q, causal), axis=-1) + _EPS
  conserved_in = jnp.sum(phi_q * _mean_over_visible(phi_k / outgoing[..., None], causal), -1)
  conserved_out = jnp.sum(phi_k * _mean_over_visible(phi_q / incoming[..., None], causal), -1)
  source_weight = jnp.exp(jnp.clip(conserved_out, -1.0, 1.0))
  competition = source_weight / _mean_over_visible(source_weight, causal)
  out = api.linear_attention(
    phi_q,
    phi_k,
    values * competition[..., None],
    normalize=True,
    scale=1.0,
    causal=causal,
    chunk_size=chunk_size,
    impl=impl,
  )
  return (out * jax.nn.sigmoid(conserved_in)[..., None]).astype(q.dtype)
