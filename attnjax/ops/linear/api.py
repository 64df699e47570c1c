"""`linear_attention` and its one-token `linear_attention_step`, dispatched by `impl=`.

Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs") with optional decay in
log space, which covers RetNet / Lightning Attention (a constant per head), data-dependent
scalar decay (Mamba-2 style) and data-dependent vector decay (GLA):

    S_t = diag(a_t) S_{t-1} + phi(k_t)^T v_t,    o_t = phi(scale * q_t) S_t
    normalized:  o_t = phi(scale * q_t) S_t / (phi(scale * q_t) z_t + eps),
                 z_t = a_t z_{t-1} + phi(k_t)

`scale` multiplies the query before the feature map, so it changes the function for every
map but the identity even when normalized: with BASED's Taylor map the score is
`1 + s + s^2 / 2` with `s = scale * q.k`.

State heads are the *query* heads: with GQA each query head keeps its own state (the decay
may differ per query head), so the state is `[batch, heads, key_dim, value_dim]` with
`key_dim` the feature map's output size. With `normalize=True` the normalizer `z` rides in
one extra value column: the state is `[batch, heads, key_dim, value_dim + 1]`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from attnjax import registry
from attnjax.ops.linear import chunk, decay, feature_maps, pallas, reference
from attnjax.ops.qkv import check_qkv, resolve_scale

# Keeps a normalized row finite when its denominator vanishes (Katharopoulos et al. use 1e-6).
NORMALIZER_EPS = 1e-6

IMPLS: dict[str, Callable] = {
  "reference": reference.linear_attention,
  "xla": chunk.linear_attention,
  "pallas": functools.partial(pallas.linear_attention, interpret=False),
  "pallas_interpret": functools.partial(pallas.linear_attention, interpret=True),
}


def linear_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  log_decay: jax.Array | None = None,
  feature_map: str | feature_maps.FeatureMap | None = None,
  normalize: bool = False,
  scale: float | None = None,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  chunk_size: int = 64,
  causal: bool = True,
  impl: str = "auto",
):
  """Linear attention over `[batch, seq, heads, dim]`, optionally decayed and normalized.

  Args:
    q: `[batch, seq, heads, head_dim]`.
    k: `[batch, seq, kv_heads, head_dim]`; `heads % kv_heads == 0` (GQA by shape).
    v: `[batch, seq, kv_heads, value_dim]`.
    log_decay: log of the state decay a_t (<= 0): None (no decay), `[heads]` (constant per
      head), `[batch, seq, heads]` (data-dependent scalar) or `[batch, seq, heads, key_dim]`
      (data-dependent vector over the state's key_dim, GLA).
    feature_map: `phi`, a name from `feature_maps.FEATURE_MAPS` ("identity", "elu+1", "relu",
      "softmax", "silu", "taylor") or a callable `[..., head_dim] -> [..., key_dim]`; None:
      identity.
    normalize: divide by `phi(scale * q_t) z_t` (needs a positive feature map, e.g. "elu+1").
    scale: multiplies `q` before the feature map (`phi(scale * q)`); None means
      `head_dim ** -0.5`.
    initial_state: float32 `[batch, heads, key_dim, value_dim (+1 if normalize)]`, or None
      for zeros.
    return_final_state: also return the state after the last token.
    chunk_size: tokens per chunk of the chunked implementations.
    causal: True: token t reads `S_t`. False (bidirectional, for encoders): every token reads
      the final state `S_T`, so with decay key s is weighted by `a_{s+1} ... a_T`.
    impl: "reference" | "xla" | "pallas" | "pallas_interpret" | "auto".

  Returns:
    `out [batch, seq, heads, value_dim]` in q's dtype, and the float32 final state if
    `return_final_state`.
  """
  shape = check_qkv(q, k, v, same_length=True)
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got chunk_size={chunk_size!r}")
  phi = feature_maps.resolve(feature_map)
  scale = resolve_scale(scale, shape.head_dim)
  q_features = phi(q.astype(jnp.float32) * scale).astype(q.dtype)
  k_features = phi(k.astype(jnp.float32)).astype(k.dtype)
  if q_features.shape[:-1] != q.shape[:-1] or k_features.shape[-1] != q_features.shape[-1]:
    raise ValueError(
      f"feature_map must map [..., head_dim] to [..., key_dim] along the last axis only; "
      f"it gave q features {q_features.shape} for q {q.shape}, k features "
      f"{k_features.shape} for k {k.shape}"
    )
  key_dim = q_features.shape[-1]
  values = v
  if normalize:
    values = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
  state_shape = (shape.batch, shape.heads, key_dim, values.shape[-1])
  if initial_state is None:
    initial_state = jnp.zeros(state_shape, jnp.float32)
  elif initial_state.shape != state_shape:
    extra = " + 1 (normalize=True: the last column holds the normalizer)" if normalize else ""
    raise ValueError(
      f"initial_state must be [batch, heads, key_dim, value_dim{extra}] = {state_shape}, "
      f"got shape {initial_state.shape}"
    )
  log_decay = decay.broadcast_log_decay(
    log_decay, batch=shape.batch, seq=shape.q_len, heads=shape.heads, key_dim=key_dim
  )
  out, final_state = registry.dispatch(
    IMPLS,
    impl,
    q_features,
    k_features,
    values,
    log_decay=log_decay,
    initial_state=initial_state.astype(jnp.float32),
    causal=bool(causal),
    chunk_size=chunk_size,
  )
  if normalize:
    out = out[..., :-1] / (out[..., -1:] + NORMALIZER_EPS)
  out = out.astype(q.dtype)
  return (out, final_state) if return_final_state else out


def _check_token(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array) -> None:
  """Raises a `ValueError` unless q_t, k_t, v_t are one token each: `[batch, heads, dim]`."""
  for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
    if x.ndim != 3:
      raise ValueError(f"{name} must be [batch, heads, dim] (one token), got shape {x.shape}")


def linear_attention_step(
  q_t: jax.Array,
  k_t: jax.Array,
  v_t: jax.Array,
  state: jax.Array,
  *,
  log_decay: jax.Array | None = None,
  feature_map: str | feature_maps.FeatureMap | None = None,
  normalize: bool = False,
  scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One decoding step in constant memory: the token after the one `state` ends with.

  Args:
    q_t: `[batch, heads, head_dim]`; `k_t [batch, kv_heads, head_dim]`;
      `v_t [batch, kv_heads, value_dim]`.
    state: float32 `[batch, heads, key_dim, value_dim (+1 if normalize)]`, e.g. the final
      state of `linear_attention(..., return_final_state=True)`.
    log_decay: None, `[heads]`, `[batch, heads]` or `[batch, heads, key_dim]`.
    feature_map, normalize, scale: as in `linear_attention`.

  Returns:
    (`o_t [batch, heads, value_dim]` in q_t's dtype, new float32 state).
  """
  _check_token(q_t, k_t, v_t)
  if log_decay is not None and jnp.ndim(log_decay) > 1:
    if jnp.ndim(log_decay) not in (2, 3):
      raise ValueError(
        f"log_decay must be [heads], [batch, heads] or [batch, heads, key_dim], got shape "
        f"{jnp.shape(log_decay)}"
      )
    log_decay = jnp.expand_dims(log_decay, 1)  # the one-token sequence axis
  out, state = linear_attention(
    q_t[:, None],
    k_t[:, None],
    v_t[:, None],
    log_decay=log_decay,
    feature_map=feature_map,
    normalize=normalize,
    scale=scale,
    initial_state=state,
    return_final_state=True,
    impl="reference",
  )
  return out[:, 0], state
