"""Gated linear attention (Yang et al. 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training", ICML, arXiv 2312.06635): linear attention whose state decays by
a data-dependent gate over the key channels.

    alpha_t = sigmoid(x_t W_a1 W_a2 + b_a) ** (1 / tau)          [b, t, h, key_dim], tau = 16
    S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,     o_t = (scale * q_t) S_t

(Sec. 4.4, the GLA Transformer's low-rank gate; `gate_logits` is `x_t W_a1 W_a2 + b_a`, the
mixer's projection.) The decay is computed in log space, `log alpha_t =
log_sigmoid(gate_logits) / tau`, and passed to `linear_attention` as its vector `log_decay`, so
every implementation (and LASP-2 / ZeCO, through `gla_keywords`) runs it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.ops.linear import api
from attnjax.ops.qkv import check_qkv

# Yang et al. 2024 (Sec. 4.4): "tau = 16 is a temperature term that encourages the model to
# have a slower forget rate".
GLA_TEMPERATURE = 16.0


def gla_log_decay(gate_logits: jax.Array, *, temperature: float = GLA_TEMPERATURE) -> jax.Array:
  """`log alpha = log_sigmoid(gate_logits) / temperature`, float32, same shape (all <= 0)."""
  if not temperature > 0:
    raise ValueError(f"temperature must be positive, got temperature={temperature}")
  return jax.nn.log_sigmoid(jnp.asarray(gate_logits).astype(jnp.float32)) / temperature


def gla_keywords(kwargs: dict, heads: int) -> dict:
  """`linear_attention` keywords equal to a `gla_attention` call's keywords `kwargs`."""
  del heads
  kwargs = dict(kwargs)
  if "log_decay" in kwargs:
    raise ValueError("gla_attention computes its log_decay from gate_logits; do not pass one")
  if "gate_logits" not in kwargs:
    raise ValueError("gla_attention needs gate_logits [batch, seq, heads, head_dim]")
  gate_logits = kwargs.pop("gate_logits")
  temperature = kwargs.pop("temperature", GLA_TEMPERATURE)
  return {**kwargs, "log_decay": gla_log_decay(gate_logits, temperature=temperature)}


def gla_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  gate_logits: jax.Array,
  temperature: float = GLA_TEMPERATURE,
  scale: float | None = None,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  chunk_size: int = 64,
  causal: bool = True,
  impl: str = "auto",
):
  """Gated linear attention over `[batch, seq, heads, dim]` (see the module docstring).

  Args:
    q: `[batch, seq, heads, head_dim]`.
    k: `[batch, seq, kv_heads, head_dim]`; `heads % kv_heads == 0` (GQA by shape).
    v: `[batch, seq, kv_heads, value_dim]`.
    gate_logits: `[batch, seq, heads, head_dim]`, the pre-sigmoid gate `x W_a1 W_a2 + b_a` of
      each query head's state (one decay per key channel).
    temperature: `tau` of `alpha = sigmoid(gate_logits) ** (1 / tau)`.
    scale: multiplies q; None means `head_dim ** -0.5`.
    initial_state, return_final_state, chunk_size, causal, impl: as `linear_attention`
      (state `[batch, heads, head_dim, value_dim]` float32).

  Returns:
    `out [batch, seq, heads, value_dim]` in q's dtype, and the final state if
    `return_final_state`.
  """
  check_qkv(q, k, v, same_length=True)
  if jnp.shape(gate_logits) != q.shape:
    raise ValueError(
      f"gate_logits must be [batch, seq, heads, head_dim] = {q.shape} like q, got shape "
      f"{jnp.shape(gate_logits)}"
    )
  keywords = gla_keywords(
    dict(
      gate_logits=gate_logits,
      temperature=temperature,
      scale=scale,
      initial_state=initial_state,
      return_final_state=return_final_state,
      chunk_size=chunk_size,
      causal=causal,
      impl=impl,
    ),
    q.shape[2],
  )
  return api.linear_attention(q, k, v, **keywords)
