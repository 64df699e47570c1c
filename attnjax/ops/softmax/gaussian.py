"""Gaussian adaptive attention (Ioannides et al. 2024, "Gaussian Adaptive Attention is All You
Need: Robust Contextual Representations Across Multiple Modalities", arXiv 2401.11143).

The paper's multi-head Gaussian adaptive attention (GAAM) weighs every feature of head h by a
Gaussian density of where it lies relative to the feature's mean and variance, with a learnable
mean offset `delta_h` and variance scale `xi_h` per head. Per feature channel, equation by
equation:

    mu_t    = mean of x_s over the positions s that t may see
    var_t   = mean of x_s^2 over the same positions - mu_t^2
    phi_t   = mu_t + delta_h                                   (offset mean)
    z_t     = (x_t - phi_t) / sqrt(var_t + eps)                (normalized feature)
    out_t   = x_t * exp(-z_t^2 / (2 xi_h))
            = x_t * exp(-(x_t - mu_t - delta_h)^2 / (2 xi_h (var_t + eps)))

Interpretations: the statistics run over the sequence axis (the released code leaves the axis
a parameter); the paper takes them over the whole sequence (`causal=False`), and
`causal=True` (the default, for language models) takes them over s <= t, so position t reads
no future token. With `segment_ids`, statistics stay within the contiguous run of equal ids
holding t. The released code also multiplies several Gaussians per head and renormalizes the
weights over the axis; the paper's single Gaussian without renormalization is implemented.

Impl "reference" averages with a dense `[seq, seq]` matrix; "xla" uses prefix sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax import registry


def gaussian_attention(
  x: jax.Array,
  mean_offset: jax.Array,
  var_scale: jax.Array,
  *,
  causal: bool = True,
  segment_ids: jax.Array | None = None,
  eps: float = 1e-5,
  impl: str = "auto",
) -> jax.Array:
  """Multi-head Gaussian feature weighting of `x [batch, seq, heads, head_dim]`.

  Args:
    x: `[batch, seq, heads, head_dim]`, e.g. the value projection of the layer input.
    mean_offset: `[heads]`, learnable offset `delta_h` of the mean.
    var_scale: `[heads]`, positive learnable scale `xi_h` of the variance.
    causal: statistics of position t over positions <= t (else over the whole sequence).
    segment_ids: int `[batch, seq]`: statistics only within t's run of equal ids.
    eps: added to the variance before it is scaled by `var_scale`.
    impl: "reference" | "xla" | "auto".

  Returns:
    `[batch, seq, heads, head_dim]` in x's dtype.
  """
  if x.ndim != 4:
    raise ValueError(f"x must be [batch, seq, heads, head_dim], got shape {x.shape}")
  batch, seq, heads, _ = x.shape
  for name, value in (("mean_offset", mean_offset), ("var_scale", var_scale)):
    if value.shape != (heads,):
      raise ValueError(f"{name} must be [heads] = ({heads},), got {value.shape}")
  runs = None
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    if segment_ids.shape != (batch, seq):
      raise ValueError(
        f"segment_ids must be [batch, seq] = ({batch}, {seq}), got {segment_ids.shape}"
      )
    runs = _run_ids(segment_ids)
  if not eps > 0:
    raise ValueError(f"eps must be positive, got eps={eps}")
  return registry.dispatch(
    IMPLS, impl, x, mean_offset, var_scale, causal=causal, runs=runs, eps=float(eps)
  )


def _run_ids(segment_ids) -> jax.Array:
  """`[batch, seq]` index of each position's contiguous run of equal segment ids."""
  starts = jnp.concatenate(
    [jnp.zeros_like(segment_ids[:, :1]), (segment_ids[:, 1:] != segment_ids[:, :-1])], axis=1
  )
  return jnp.cumsum(starts.astype(jnp.int32), axis=1)


def _weigh(x, mean, second_moment, mean_offset, var_scale, eps):
  """`x * exp(-(x - mu - delta)^2 / (2 xi (var + eps)))` from float32 moments."""
  xf = x.astype(jnp.float32)
  var = jnp.maximum(second_moment - mean**2, 0.0)  # rounding can make it slightly negative
  offset = mean_offset.astype(jnp.float32)[:, None]
  scaled_var = var_scale.astype(jnp.float32)[:, None] * (var + eps)
  weight = jnp.exp(-((xf - mean - offset) ** 2) / (2 * scaled_var))
  return (xf * weight).astype(x.dtype)


def _reference(x, mean_offset, var_scale, *, causal, runs, eps):
  seq = x.shape[1]
  pos = jnp.arange(seq)
  allowed = (pos[None, :] <= pos[:, None]) if causal else jnp.ones((seq, seq), bool)
  allowed = allowed[None]
  if runs is not None:
    allowed = allowed & (runs[:, :, None] == runs[:, None, :])
  average = allowed / allowed.sum(-1, keepdims=True)  # [batch or 1, seq, seq]
  xf = x.astype(jnp.float32)
  mean = jnp.einsum("bts,bshd->bthd", average, xf)
  second_moment = jnp.einsum("bts,bshd->bthd", average, xf**2)
  return _weigh(x, mean, second_moment, mean_offset, var_scale, eps)


def _prefix_sums(x, causal, runs):
  """Sums of x over each position's allowed positions, `[batch, seq, ...]` like x."""
  seq = x.shape[1]
  total = jnp.cumsum(x, axis=1)
  padded = jnp.concatenate([jnp.zeros_like(x[:, :1]), total], axis=1)  # padded[i] = sum of x[:i]
  pos = jnp.broadcast_to(jnp.arange(seq), x.shape[:2])
  if runs is None:
    first, last = jnp.zeros_like(pos), jnp.full_like(pos, seq - 1)
  else:
    is_start = jnp.concatenate([jnp.ones_like(runs[:, :1]), runs[:, 1:] != runs[:, :-1]], axis=1)
    first = jax.lax.cummax(jnp.where(is_start, pos, 0), axis=1)
    is_end = jnp.concatenate([runs[:, 1:] != runs[:, :-1], jnp.ones_like(runs[:, :1])], axis=1)
    last = jax.lax.cummin(jnp.where(is_end, pos, seq - 1), axis=1, reverse=True)
  if causal:
    last = pos
  expand = (slice(None), slice(None)) + (None,) * (x.ndim - 2)

  def take(index):
    return jnp.take_along_axis(padded, index[expand], axis=1)

  return take(last + 1) - take(first), (last - first + 1)[expand]


def _blocked(x, mean_offset, var_scale, *, causal, runs, eps):
  xf = x.astype(jnp.float32)
  total, count = _prefix_sums(xf, causal, runs)
  total_sq, _ = _prefix_sums(xf**2, causal, runs)
  return _weigh(x, total / count, total_sq / count, mean_offset, var_scale, eps)


def gaussian_chunk(x, mean_offset, var_scale, sums, start, *, eps: float = 1e-5):
  """Causal Gaussian weighting of the next `n` positions of a stream (decoding).

  Args:
    x: `[batch, n, heads, head_dim]`, the chunk at positions `start + [0, n)`.
    mean_offset, var_scale, eps: as `gaussian_attention`.
    sums: float32 (sum of x, sum of x^2) `[batch, heads, head_dim]` over positions `< start`.
    start: int32 scalar (may be traced), the position of `x[:, 0]`.

  Returns:
    (`out` like x, the sums over positions `< start + n`): out equals `gaussian_attention(...,
    causal=True)` of the whole stream at these positions.
  """
  xf = x.astype(jnp.float32)
  total, total_sq = (
    jnp.cumsum(y, axis=1) + s[:, None] for y, s in zip((xf, xf**2), sums, strict=True)
  )
  count = (start + 1 + jnp.arange(x.shape[1])).astype(jnp.float32)[None, :, None, None]
  out = _weigh(x, total / count, total_sq / count, mean_offset, var_scale, eps)
  return out, (total[:, -1], total_sq[:, -1])


IMPLS = {"reference": _reference, "xla": _blocked}


def _example(key, *, batch, seq, heads, kv_heads, head_dim):
  del kv_heads
  k_x, k_mean, k_var = jax.random.split(key, 3)
  x = jax.random.normal(k_x, (batch, seq, heads, head_dim))
  mean_offset = 0.1 * jax.random.normal(k_mean, (heads,))
  var_scale = jnp.exp(0.1 * jax.random.normal(k_var, (heads,)))
  return (x, mean_offset, var_scale), {}


registry.register(
  "gaussian",
  gaussian_attention,
  family="softmax",
  paper="Ioannides et al. 2024, Gaussian Adaptive Attention is All You Need: Robust "
  "Contextual Representations Across Multiple Modalities (arXiv 2401.11143)",
  description="per-head Gaussian density of each feature around learnable mean and variance",
  capabilities=registry.Capabilities(
    causal=True, bidirectional=True, causal_keyword=True, gqa=False, segment_ids=True
  ),
  impls=tuple(IMPLS),
  module="attnjax.nn.softmax_variants:GaussianAttention",
  example=_example,
)
