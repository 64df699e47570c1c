"""Core context aware attention (Chen et al. 2024, "Core Context Aware Transformers for Long
Context Language Modeling", arXiv 2412.12465).

Two key sets share one softmax per query. With group size g, local window s and 1-based
positions as in the paper, equation by equation:

- globality-aware pooling: the sequence is cut into groups I_m = {(m-1)g+1, ..., mg}; group m
  is merged into one core token weighted by the significance of its tokens to the group's last
  query,

      c_m = softmax(q_{mg} K_{I_m}^T / sqrt(d)) X_{I_m},   K^G = C W_K,  V^G = C W_V,

  and query i sees the cores 1..j(i), j(i) = max(0, floor((i - s) / g)) (causal: a core joins
  once its group lies s tokens behind the query);
- locality preservation: query i sees its tokens k(i)..i themselves,
  k(i) = max(1, i - s - ((i - s) mod g)), i.e. at least its s most recent tokens, reaching back
  to the end of the last visible core group;
- fusion: one softmax over both sets,

      out_i = softmax(q_i [K^G_{1..j(i)}; K_{k(i)..i}]^T / sqrt(d)) [V^G_{1..j(i)}; V_{k(i)..i}].

Interpretations: k(i) is read as the first token after core j(i) (jg + 1), so cores and local
tokens cover every earlier position exactly once (the formula as printed, jg, would also list
the last token of core j); the cores pool the keys and values the op receives, `c_m K` and
`c_m V` with the significance above, which equals projecting the pooled input when K and V are
linear in X (with rotary positions on K it pools rotated keys); cores are computed per query
head (each head's last query weighs its kv head's keys, the same as the paper under MHA).

The two partial attentions (cores; local tokens through `dot_product_attention` with the
`LocalKeys` mask) are merged exactly through the local part's log-sum-exp.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks, registry
from attnjax.ops.qkv import QKVShape, check_qkv, resolve_scale
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
    group_size: g, tokens merged into one core token.
    window: s, the fewest local tokens attended directly (the query's own included); the
      window reaches back to the end of the last visible core group, up to s + g - 1 tokens.
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


@dataclasses.dataclass(frozen=True)
class LocalKeys(masks.Mask):
  """CCA's local keys of query t (0-based): `group_size * j(t) <= kv <= t`, where
  `j(t) = max(0, (t + 1 - window) // group_size)` cores are visible to t."""

  group_size: int
  window: int

  def _first_key(self, q):
    return self.group_size * np.maximum(0, (q + 1 - self.window) // self.group_size)

  def _eval(self, h, q, k):
    return (k <= q) & (k >= self._first_key(q))

  def _bounds(self, h, q_lo, q_hi, k_lo, k_hi):
    # The first local key never decreases with the query position.
    may = (k_lo <= q_hi - 1) & (k_hi - 1 >= self._first_key(q_lo))
    must = (k_hi - 1 <= q_lo) & (k_lo >= self._first_key(q_hi - 1))
    return may, must


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
    mask=LocalKeys(group_size, window),
    scale=scale,
    impl=local_impl,
    return_lse=True,
  )  # the query's own key is always in the window: local_lse is finite
  core_k, core_v = _core_tokens(q, k, v, shape, group_size, scale)
  core_logits = jnp.einsum("bqhd,bmhd->bqhm", q.astype(jnp.float32), core_k) * scale
  group_end = (jnp.arange(core_k.shape[1]) + 1) * group_size - 1
  visible = group_end[None, :] <= jnp.arange(shape.q_len)[:, None] - window  # [q, m]
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
