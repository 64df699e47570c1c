"""Gated DeltaNet's decay gate (Yang, Kautz and Hatamizadeh 2024, "Gated Delta Networks:
Improving Mamba2 with Delta Rule", arXiv 2412.06464, Sec. 3): Mamba-2's data-dependent scalar
decay per head,

    a_t = exp(-exp(A_log) * softplus(x_t W_a + dt_bias))

so `log a_t = -exp(A_log) * softplus(gate_logits + dt_bias)` is computed without exponentiating
(`gate_logits` is the mixer's projection `x_t W_a`). The initialization of `A_log` and
`dt_bias` follows the authors' released code (Mamba-2's): `A` uniform in [1, 16], `dt`
log-uniform in [0.001, 0.1] stored as its inverse softplus.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.ops.delta import api

A_RANGE = (1.0, 16.0)
DT_RANGE = (1e-3, 1e-1)


def gated_delta_log_decay(
  gate_logits: jax.Array, a_log: jax.Array, dt_bias: jax.Array
) -> jax.Array:
  """`gate_logits [batch, seq, heads]`, `a_log`, `dt_bias [heads]` -> float32 `log a_t` (< 0)."""
  heads = jnp.shape(gate_logits)[-1:]
  if jnp.ndim(gate_logits) != 3 or jnp.shape(a_log) != heads or jnp.shape(dt_bias) != heads:
    raise ValueError(
      f"gate_logits must be [batch, seq, heads] and a_log, dt_bias [heads]; got gate_logits "
      f"{jnp.shape(gate_logits)}, a_log {jnp.shape(a_log)}, dt_bias {jnp.shape(dt_bias)}"
    )
  dt = jax.nn.softplus(jnp.asarray(gate_logits, jnp.float32) + jnp.asarray(dt_bias, jnp.float32))
  return -jnp.exp(jnp.asarray(a_log, jnp.float32)) * dt


def init_a_log(key: jax.Array, heads: int) -> jax.Array:
  """`log A`, A uniform in `A_RANGE`: `[heads]` float32."""
  return jnp.log(jax.random.uniform(key, (heads,), minval=A_RANGE[0], maxval=A_RANGE[1]))


def init_dt_bias(key: jax.Array, heads: int) -> jax.Array:
  """`softplus^-1(dt)`, dt log-uniform in `DT_RANGE`: `[heads]` float32."""
  low, high = (jnp.log(x) for x in DT_RANGE)
  dt = jnp.exp(jax.random.uniform(key, (heads,), minval=low, maxval=high))
  return dt + jnp.log(-jnp.expm1(-dt))


def gated_delta_rule_attention(q, k, v, beta, *, log_decay: jax.Array, **kwargs):
  """Gated DeltaNet's token mixing: `api.delta_rule_attention` with a required `log_decay`
  `[batch, seq, heads]` (e.g. `gated_delta_log_decay`); other arguments as there."""
  if log_decay is None:
    raise ValueError("gated_delta_rule_attention needs log_decay [batch, seq, heads], got None")
  return api.delta_rule_attention(q, k, v, beta, log_decay=log_decay, **kwargs)
