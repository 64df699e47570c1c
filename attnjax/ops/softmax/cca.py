"""Core context aware attention (Chen et al. 2024, "Core Context Aware Transformers for Long
Context Language Modeling", arXiv 2412.12465).

Two key sets share one softmax per query i:

- globality pooling: the sequence is cut into groups of `group_size` tokens; group m is merged
  into one core token whose key and value are the group's keys and values weighted by their
  significance to the group's last query, `w_j = softmax_j(q_last . k_j * scale)`. Query i
  sees core m only once the group is complete, `(m + 1) * group_size - 1 <= i`, so a core
  token summarizes past tokens only (causal).
- locality preservation: the `window` most recent tokens `i - window < j <= i` themselves
  (`dot_product_attention` with `causal() & sliding_window(window - 1)`).

    out_i = sum_m a_im v_core_m + sum_j a_ij v_j,   a = softmax over both sets of q_i . k * scale

The two partial attentions are merged exactly through the local part's log-sum-exp. Cores are
computed per query head (the last query of each head weighs its kv head's keys).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attnjax import masks, registry
from attnjax.ops.common import QKVShape, check_qkv, resolve_scale
from attnjax.ops.softmax import api as softmax_api


def cca_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  group_size: int = 16,
  window: int = 128,
  segment_ids: jax.Array | None = None,
  scale: float | None = None,
  impl: str = "auto",
) -> jax.Array:
  """Causal core-context-aware self attention over `[batch, seq, heads, dim]`.

  Args:
    q: `[batch, seq, heads, head_dim]`.
    k: `[batch, seq, kv_heads, head_dim]`; `heads % kv_heads == 0` (GQA by shape).
    v: `[batch, seq, kv_heads, value_dim]`.
    group_size: tokens merged into one core token.
    window: local tokens attended directly, the query's own included.
    segment_ids: must be None (core tokens would merge tokens of different documents).
    scale: logit scale; None means `head_dim ** -0.5`.
    impl: implementation of the local attention, "reference" | "xla" | "auto".

  Returns:
    `[batch, seq, heads, value_dim]` in q's dtype.
  """
  shape = check_qkv(q, k, v, same_length=True)
  if not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"group_size must be a positive int, got group_size={group_size!r}")
  if not isinstance(window, int) or window < 1:
    raise ValueError(f"window must be a positive int, got window={window!r}")
  if segment_ids is not None:
    raise ValueError(
      "segment_ids must be None for cca (core tokens merge neighbouring tokens), got an array"
    )
  return registry.dispatch(
    IMPLS,
    impl,
    q,
    k,
    v,
    shape=shape,
    group_size=group_size,
    window=window,
    scale=resolve_scale(scale, shape.head_dim),
  )


def _core_tokens(q, k, v, shape: QKVShape, group_size, scale):
  """Significance-weighted group keys and values, `[batch, groups, heads, dim]` float32."""
  num_groups = -(-shape.kv_len // group_size)
  pad = num_groups * group_size - shape.kv_len  # an incomplete last group is never visible

  def grouped(x):
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    return x.reshape(shape.batch, num_groups, group_size, *x.shape[2:])

  qg, kg, vg = grouped(q), grouped(k), grouped(v)
  last_q = qg[:, :, -1].reshape(shape.batch, num_groups, shape.kv_heads, shape.groups, -1)
  significance = jax.nn.softmax(
    jnp.einsum("bmhgd,bmjhd->bmhgj", last_q, kg) * scale, axis=-1
  )  # [b, m, hk, g, group_size]
  core_k, core_v = (
    jnp.einsum("bmhgj,bmjhd->bmhgd", significance, x).reshape(
      shape.batch, num_groups, shape.heads, -1
    )
    for x in (kg, vg)
  )
  return core_k, core_v


def _cca(q, k, v, *, shape, group_size, window, scale, local_impl):
  local, local_lse = softmax_api.dot_product_attention(
    q,
    k,
    v,
    mask=masks.causal() & masks.sliding_window(window - 1),
    scale=scale,
    impl=local_impl,
    return_lse=True,
  )  # the query's own key is always in the window: local_lse is finite
  core_k, core_v = _core_tokens(q, k, v, shape, group_size, scale)
  core_logits = jnp.einsum("bqhd,bmhd->bqhm", q.astype(jnp.float32), core_k) * scale
  group_end = (jnp.arange(core_k.shape[1]) + 1) * group_size - 1
  visible = group_end[None, :] <= jnp.arange(shape.q_len)[:, None]  # [q, m]
  visible = visible[None, :, None, :]
  # Shift by a finite maximum and exponentiate only visible logits: no inf, no NaN gradient.
  shift = jnp.maximum(local_lse, jnp.max(jnp.where(visible, core_logits, local_lse[..., None]), -1))
  core_terms = jnp.exp(jnp.where(visible, core_logits - shift[..., None], -jnp.inf))
  lse = shift + jnp.log(jnp.exp(local_lse - shift) + core_terms.sum(-1))
  local_weight = jnp.exp(local_lse - lse)[..., None]
  core_out = jnp.einsum("bqhm,bmhd->bqhd", core_terms, core_v) * jnp.exp(shift - lse)[..., None]
  return (local_weight * local.astype(jnp.float32) + core_out).astype(q.dtype)


IMPLS = {impl: functools.partial(_cca, local_impl=impl) for impl in ("reference", "xla")}

registry.register(
  "cca",
  cca_attention,
  family="softmax",
  paper="Chen et al. 2024, Core Context Aware Transformers for Long Context Language "
  "Modeling (arXiv 2412.12465)",
  description="causal core tokens pooled from groups by significance + sliding-window tokens",
  capabilities=registry.Capabilities(causal=True),
  impls=tuple(IMPLS),
  module="attnjax.nn.attention:Attention",
  example=lambda key, **sizes: (registry.random_qkv(key, **sizes), {"group_size": 4, "window": 6}),
)
