"""Flow attention (Wu et al. 2022, "Flowformer: Linearizing Transformers with Conservation
Flows", ICML, Sec. 3): linear attention normalized by flow conservation.

With `phi = sigmoid`, queries are sinks and keys are sources. The paper's flows are sums over
the `n` queries and `m` keys; they are written here as means over the visible tokens (all
tokens, or the prefix `<= i` when causal, as the authors' causal code does), which for
self-attention (`n = m`) gives the paper's function exactly:

    incoming  I_i = phi(q_i) . mean_j phi(k_j)          outgoing  O_j = phi(k_j) . mean_i phi(q_i)
    conserved incoming  I^_i = phi(q_i) . mean_j (phi(k_j) / O_j)
    conserved outgoing  O^_j = phi(k_j) . mean_i (phi(q_i) / I_i)
    competition  c_j = exp(O^_j) / mean_j' exp(O^_j')   (= m softmax(O^)_j)
    allocation   out_i = sigmoid(I^_i) * sum_j w_ij c_j v_j / sum_j w_ij,   w_ij = phi(q_i).phi(k_j)

Causal: the means run over prefixes (`mean_j'` over `j' <= j` for the competition of key j)
and `O^` is clipped to [-1, 1] before `exp`, as in the authors' causal implementation; the
bidirectional form is unclipped, as the paper and its non-causal code. The last line is
normalized linear attention of (phi(q), phi(k), c * v), computed by `linear_attention`; the
flow statistics are prefix (or total) means, linear in T.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnjax.ops.linear import api
from attnjax.ops.qkv import check_qkv

# Guards the flow divisions as Flowformer does; sigmoid features are positive anyway.
_EPS = 1e-6


class FlowState(NamedTuple):
  """What causal flow attention carries across tokens (all float32, query heads `h`).

  count `[b]` tokens seen; sum_k, sum_q, sum_k_over_out, sum_q_over_in `[b, h, d]` running
  sums of phi(k), phi(q), phi(k_j) / O_j, phi(q_i) / I_i; sum_source `[b, h]` of
  exp(O^_j); linear `[b, h, d, dv + 1]` the normalized linear-attention state.
  """

  count: jax.Array
  sum_k: jax.Array
  sum_q: jax.Array
  sum_k_over_out: jax.Array
  sum_q_over_in: jax.Array
  sum_source: jax.Array
  linear: jax.Array

  @classmethod
  def zeros(cls, batch: int, heads: int, head_dim: int, value_dim: int) -> FlowState:
    """The state before the first token."""
    sums = jnp.zeros((batch, heads, head_dim), jnp.float32)
    return cls(
      jnp.zeros((batch,), jnp.float32),
      sums,
      sums,
      sums,
      sums,
      jnp.zeros((batch, heads), jnp.float32),
      jnp.zeros((batch, heads, head_dim, value_dim + 1), jnp.float32),
    )


def _visible_mean(x: jax.Array, causal: bool, prior_sum: jax.Array, prior_count: jax.Array):
  """`[b, t, ...]` -> (mean over positions `<= i` (causal) or all, same shape; new sum).

  Causal means include `prior_sum` over `prior_count [b]` earlier tokens.
  """
  if not causal:
    return jnp.broadcast_to(jnp.mean(x, axis=1, keepdims=True), x.shape), None
  sums = prior_sum[:, None] + jnp.cumsum(x, axis=1)
  counts = prior_count[:, None] + jnp.arange(1, x.shape[1] + 1, dtype=jnp.float32)
  return sums / counts.reshape(*counts.shape, *([1] * (x.ndim - 2))), sums[:, -1]


def flow_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  causal: bool = True,
  initial_state: FlowState | None = None,
  return_final_state: bool = False,
  chunk_size: int = 64,
  impl: str = "auto",
):
  """`q [b, t, h, d]`, `k [b, t, hk, d]`, `v [b, t, hk, dv]` -> `[b, t, h, dv]`.

  Causal calls take and return a `FlowState` (`initial_state`, `return_final_state`), so a
  sequence can be processed in pieces or decoded token by token (the variant's `step`).
  """
  shape = check_qkv(q, k, v, same_length=True)
  if not causal and (initial_state is not None or return_final_state):
    raise ValueError("flow_attention carries a state only when causal=True")
  state = initial_state
  if state is None:
    state = FlowState.zeros(shape.batch, shape.heads, shape.head_dim, v.shape[-1])
  elif state.linear.shape != (shape.batch, shape.heads, shape.head_dim, v.shape[-1] + 1):
    raise ValueError(
      f"initial_state.linear must be [batch, heads, head_dim, value_dim + 1] = "
      f"{(shape.batch, shape.heads, shape.head_dim, v.shape[-1] + 1)}, got shape "
      f"{state.linear.shape}"
    )
  phi_q = jax.nn.sigmoid(q.astype(jnp.float32))
  phi_k = jnp.repeat(jax.nn.sigmoid(k.astype(jnp.float32)), shape.groups, axis=2)
  values = jnp.repeat(v.astype(jnp.float32), shape.groups, axis=2)

  def mean(x, prior_sum):
    return _visible_mean(x, causal, prior_sum, state.count)

  mean_k, sum_k = mean(phi_k, state.sum_k)
  mean_q, sum_q = mean(phi_q, state.sum_q)
  incoming = jnp.sum(phi_q * mean_k, axis=-1) + _EPS  # [b, t, h]
  outgoing = jnp.sum(phi_k * mean_q, axis=-1) + _EPS
  mean_k_over_out, sum_k_over_out = mean(phi_k / outgoing[..., None], state.sum_k_over_out)
  mean_q_over_in, sum_q_over_in = mean(phi_q / incoming[..., None], state.sum_q_over_in)
  conserved_in = jnp.sum(phi_q * mean_k_over_out, -1)
  conserved_out = jnp.sum(phi_k * mean_q_over_in, -1)
  if causal:
    conserved_out = jnp.clip(conserved_out, -1.0, 1.0)
  else:  # a softmax over keys: shifting by the max keeps exp finite and changes nothing
    conserved_out = conserved_out - jax.lax.stop_gradient(
      jnp.max(conserved_out, axis=1, keepdims=True)
    )
  source_weight = jnp.exp(conserved_out)
  mean_source, sum_source = mean(source_weight, state.sum_source)
  out, linear = api.linear_attention(
    phi_q,
    phi_k,
    values * (source_weight / mean_source)[..., None],
    normalize=True,
    scale=1.0,
    initial_state=state.linear,
    return_final_state=True,
    causal=causal,
    chunk_size=chunk_size,
    impl=impl,
  )
  out = (out * jax.nn.sigmoid(conserved_in)[..., None]).astype(q.dtype)
  if not return_final_state:
    return out
  count = state.count + shape.q_len
  return out, FlowState(count, sum_k, sum_q, sum_k_over_out, sum_q_over_in, sum_source, linear)
