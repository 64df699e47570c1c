"""Softplus attention with length scaling and re-weighting (Gao & Spratling 2025, "Softplus
Attention with Re-weighting Boosts Length Extrapolation in Large Language Models",
arXiv 2501.13428).

Softmax is read as a positivity transform (exp) followed by l1 normalization; the paper keeps
the normalization and replaces exp with softplus (LSSA), scaling the logits of row i by a
length factor from entropy invariance, and sharpens the weights by a power (LSSAR):

    s_ij = lambda_i * q_i . k_j * scale,        lambda_i = log(n_i) / log(train_len)
    a_ij = softplus(s_ij) / sum_j softplus(s_ij)              (over the n_i allowed keys j)
    a_ij <- a_ij^p / sum_j a_ij^p = softplus(s_ij)^p / sum_j softplus(s_ij)^p     (p > 1)

Interpretations: `lambda_i` is the entropy-invariant factor log base train_len of the row's
key count (1 at the training length; `train_len=None` leaves the logits unscaled,
lambda = 1), and the re-weighting is the plain power renormalized over the row, switched on
with `reweight_power=p` (None or 1: off). A row with no allowed key returns zeros.

Impl "reference" materializes the `[q_len, kv_len]` weights; "xla" accumulates numerator and
denominator over kv blocks (no running max is needed: softplus does not overflow), holding
`[q_len, block_kv]` weights at a time.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attnjax import registry
from attnjax.ops.qkv import QKVShape, check_qkv, resolve_scale


def softplus_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  causal: bool = True,
  segment_ids: jax.Array | None = None,
  scale: float | None = None,
  train_len: int | None = None,
  reweight_power: float | None = None,
  q_offset: int = 0,
  impl: str = "auto",
  block_kv: int = 128,
) -> jax.Array:
  """Length-scaled softplus attention (LSSA), re-weighted (LSSAR) if `reweight_power`.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k: `[batch, kv_len, kv_heads, head_dim]`; `heads % kv_heads == 0` (GQA by shape).
    v: `[batch, kv_len, kv_heads, value_dim]`.
    causal: key j is allowed for query i when `j <= i + q_offset`.
    segment_ids: int `[batch, seq]` (self attention): keys only within the query's segment.
    scale: logit scale; None means `head_dim ** -0.5`.
    train_len: training length of the length scale factor; None: no length scaling.
    reweight_power: p of the re-weighting `a^p / sum a^p`; None (or 1) switches it off.
    q_offset: absolute position of the first query.
    impl: "reference" | "xla" | "auto".
    block_kv: kv block of the "xla" path.

  Returns:
    `[batch, q_len, heads, value_dim]` in q's dtype.
  """
  shape = check_qkv(q, k, v)
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    if shape.q_len != shape.kv_len or segment_ids.shape != (shape.batch, shape.q_len):
      raise ValueError(
        f"segment_ids must be [batch, seq] = ({shape.batch}, {shape.q_len}) for self "
        f"attention, got {segment_ids.shape} with q {q.shape} and k {k.shape}"
      )
  if train_len is not None and train_len < 2:
    raise ValueError(f"train_len must be >= 2 or None, got train_len={train_len}")
  if reweight_power is not None and not reweight_power > 0:
    raise ValueError(f"reweight_power must be positive or None, got {reweight_power}")
  if not isinstance(q_offset, int) or q_offset < 0:
    raise ValueError(f"q_offset must be a non-negative int, got q_offset={q_offset!r}")
  if not isinstance(block_kv, int) or block_kv < 1:
    raise ValueError(f"block_kv must be a positive int, got block_kv={block_kv!r}")
  return registry.dispatch(
    IMPLS,
    impl,
    q,
    k,
    v,
    shape=shape,
    causal=causal,
    segment_ids=segment_ids,
    scale=resolve_scale(scale, shape.head_dim),
    train_len=train_len,
    power=1.0 if reweight_power is None else float(reweight_power),
    q_offset=q_offset,
    block_kv=block_kv,
  )


def _allowed(shape: QKVShape, kv_pos, *, causal, segment_ids, q_offset) -> jax.Array:
  """`[batch or 1, q_len, len(kv_pos)]` boolean: which keys each query may see."""
  q_pos = jnp.arange(shape.q_len)[:, None] + q_offset
  allowed = (kv_pos[None, :] <= q_pos) if causal else jnp.ones((shape.q_len, 1), bool)
  allowed = allowed & (kv_pos[None, :] < shape.kv_len)  # padding of the last block
  allowed = allowed[None]
  if segment_ids is not None:
    kv_ids = jnp.take(segment_ids, jnp.minimum(kv_pos, shape.kv_len - 1), axis=1)
    allowed = allowed & (segment_ids[:, :, None] == kv_ids[:, None, :])
  return allowed


def _length_scale(num_allowed, train_len) -> jax.Array:
  """lambda_i = log(n_i) / log(train_len), `[batch or 1, 1, q_len]` float32."""
  if train_len is None:
    return jnp.ones((1, 1, 1), jnp.float32)
  lam = jnp.log(jnp.maximum(num_allowed, 1).astype(jnp.float32)) / math.log(train_len)
  return lam[:, None, :]


def _weights(q, k_block, allowed, lam, shape: QKVShape, scale, power):
  """Unnormalized `softplus(lambda * q.k * scale)^p`, `[b, hk, g, q_len, block]`, 0 if masked."""
  qf = q.astype(jnp.float32).reshape(shape.batch, shape.q_len, shape.kv_heads, shape.groups, -1)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qf, k_block.astype(jnp.float32)) * scale
  logits = logits * lam[:, :, None, :, None]
  positive = jax.nn.softplus(logits)
  if power != 1.0:
    positive = positive**power
  return jnp.where(allowed[:, None, None], positive, 0.0)


def _finish(numer, denom, q, shape: QKVShape):
  out = numer / jnp.where(denom > 0, denom, 1.0)[..., None]  # [b, hk, g, q, dv]
  out = out.transpose(0, 3, 1, 2, 4).reshape(shape.batch, shape.q_len, shape.heads, -1)
  return out.astype(q.dtype)


def _reference(q, k, v, *, shape, causal, segment_ids, scale, train_len, power, q_offset, block_kv):
  del block_kv
  allowed = _allowed(
    shape, jnp.arange(shape.kv_len), causal=causal, segment_ids=segment_ids, q_offset=q_offset
  )
  lam = _length_scale(allowed.sum(-1), train_len)
  w = _weights(q, k, allowed, lam, shape, scale, power)
  numer = jnp.einsum("bhgqk,bkhd->bhgqd", w, v.astype(jnp.float32))
  return _finish(numer, w.sum(-1), q, shape)


def _blocked(q, k, v, *, shape, causal, segment_ids, scale, train_len, power, q_offset, block_kv):
  block_kv = min(block_kv, shape.kv_len)
  num_blocks = -(-shape.kv_len // block_kv)
  pad = num_blocks * block_kv - shape.kv_len
  k_blocks, v_blocks = (
    jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    .reshape(shape.batch, num_blocks, block_kv, *x.shape[2:])
    .swapaxes(0, 1)
    for x in (k, v)
  )
  mask_kwargs = dict(causal=causal, segment_ids=segment_ids, q_offset=q_offset)

  def block_allowed(i):
    return _allowed(shape, i * block_kv + jnp.arange(block_kv), **mask_kwargs)

  # Pass 1 counts the allowed keys of every row (n_i of the length scale); pass 2 accumulates.
  def count(total, i):
    return total + block_allowed(i).sum(-1), None

  batch_or_1 = 1 if segment_ids is None else shape.batch
  counts, _ = jax.lax.scan(
    count, jnp.zeros((batch_or_1, shape.q_len), jnp.int32), jnp.arange(num_blocks)
  )
  lam = _length_scale(counts, train_len)

  def accumulate(carry, inputs):
    numer, denom = carry
    i, k_block, v_block = inputs
    w = _weights(q, k_block, block_allowed(i), lam, shape, scale, power)
    numer = numer + jnp.einsum("bhgqk,bkhd->bhgqd", w, v_block.astype(jnp.float32))
    return (numer, denom + w.sum(-1)), None

  lead = (shape.batch, shape.kv_heads, shape.groups, shape.q_len)
  init = (jnp.zeros((*lead, shape.value_dim), jnp.float32), jnp.zeros(lead, jnp.float32))
  (numer, denom), _ = jax.lax.scan(accumulate, init, (jnp.arange(num_blocks), k_blocks, v_blocks))
  return _finish(numer, denom, q, shape)


def cached_attention(
  q, k_cache, v_cache, *, q_start, kv_positions=None, causal=True, scale=None, train_len=None,
  reweight_power=None, block_kv=None,
):  # fmt: skip
  """Causal softplus attention of `q` at positions `q_start + [0, n)` over a decoding cache
  (`attnjax.ops.softmax.cached.cached_attention`'s contract: rows at positions beyond the
  chunk or negative are ignored). Each row's length scale counts its `q_pos + 1` keys, as the
  full forward does. `block_kv` is the full forward's and unused here.

  Raises:
    ValueError: `causal=False` (a bidirectional layer cannot decode).
  """
  del block_kv
  if not causal:
    raise ValueError("softplus attention decodes only with causal=True")
  shape = check_qkv(q, k_cache, v_cache)
  kv_pos = jnp.arange(shape.kv_len) if kv_positions is None else jnp.asarray(kv_positions)
  q_pos = jnp.asarray(q_start, jnp.int32) + jnp.arange(shape.q_len, dtype=jnp.int32)
  allowed = ((kv_pos[None, :] >= 0) & (kv_pos[None, :] <= q_pos[:, None]))[None]
  power = 1.0 if reweight_power is None else float(reweight_power)
  lam = _length_scale(allowed.sum(-1), train_len)
  w = _weights(q, k_cache, allowed, lam, shape, resolve_scale(scale, shape.head_dim), power)
  numer = jnp.einsum("bhgqk,bkhd->bhgqd", w, v_cache.astype(jnp.float32))
  return _finish(numer, w.sum(-1), q, shape)


IMPLS = {"reference": _reference, "xla": _blocked}

registry.register(
  "softplus",
  softplus_attention,
  family="softmax",
  paper="Gao & Spratling 2025, Softplus Attention with Re-weighting Boosts Length "
  "Extrapolation in Large Language Models (arXiv 2501.13428)",
  description="softplus + l1 norm with log-length scale; optional power re-weighting",
  capabilities=registry.Capabilities(
    causal=True, bidirectional=True, causal_keyword=True, segment_ids=True
  ),
  impls=tuple(IMPLS),
  module="attnjax.nn.attention:Attention",
  example=lambda key, **sizes: (
    registry.random_qkv(key, **sizes),
    {"train_len": 8, "reweight_power": 3.0, "block_kv": 8},
  ),
  cached=cached_attention,
)
