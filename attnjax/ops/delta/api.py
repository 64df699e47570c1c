"""`delta_rule_attention` and its one-token `delta_rule_step`, dispatched by `impl=`.

The delta rule (Schlag et al. 2021, "Linear Transformers Are Secretly Fast Weight
Programmers", arXiv 2102.11174; DeltaNet as trained by Yang et al. 2024, arXiv 2406.06484)
writes into the state only the part of `v_t` it does not already predict from `k_t`; Gated
DeltaNet (Yang, Kautz and Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with
Delta Rule", arXiv 2412.06464, Eq. 10) first decays the state by a gate `a_t` in (0, 1]:

    S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T
        = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T         S: [key_dim, value_dim]
    o_t = scale * S_t^T q_t

(the papers write the transposed state `S_t = S_{t-1} a_t (I - beta_t k_t k_t^T) + beta_t v_t
k_t^T`, `o_t = S_t q_t`). `log_decay` holds `log a_t`; None is DeltaNet (`a_t = 1`).

The op takes q and k as given. `I - beta_t k_t k_t^T` is a contraction only when
`||k_t|| = 1` and `beta_t` is in [0, 2], so the mixers (`attnjax.nn.delta`) L2-normalize q and
k per head, as both papers do; unnormalized keys can make the state grow without bound.

State heads are the query heads: with GQA, k and v are shared by a group while `beta` and the
decay are per query head. `segment_ids` restart the recurrence where the id changes (packed
documents): the state entering a document's first token is zero.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attnjax import registry
from attnjax.ops.delta import chunk, pallas, reference
from attnjax.ops.qkv import check_qkv, resolve_scale

IMPLS = {
  "reference": reference.delta_rule_attention,
  "xla": chunk.delta_rule_attention,
  "pallas": functools.partial(pallas.delta_rule_attention, interpret=False),
  "pallas_interpret": functools.partial(pallas.delta_rule_attention, interpret=True),
}


def delta_rule_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  beta: jax.Array,
  *,
  log_decay: jax.Array | None = None,
  scale: float | None = None,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
  chunk_size: int = 64,
  impl: str = "auto",
):
  """(Gated) delta-rule attention over `[batch, seq, heads, dim]` (see the module docstring).

  Args:
    q: `[batch, seq, heads, key_dim]`.
    k: `[batch, seq, kv_heads, key_dim]`; `heads % kv_heads == 0` (GQA by shape).
    v: `[batch, seq, kv_heads, value_dim]`.
    beta: `[batch, seq, heads]`, the writing strength, in (0, 1) for the papers' layers.
    log_decay: `[batch, seq, heads]`, `log a_t <= 0` (Gated DeltaNet), or None (DeltaNet).
    scale: multiplies the output; None means `key_dim ** -0.5`.
    initial_state: float32 `[batch, heads, key_dim, value_dim]`, or None for zeros.
    return_final_state: also return the state after the last token.
    segment_ids: int `[batch, seq]`; the recurrence restarts where the id changes.
    chunk_size: tokens per chunk of the chunked implementation.
    impl: "reference" (token by token, the oracle) | "xla" (chunked) | "pallas" (chunk terms
      in XLA, the walk over chunks in the TPU or GPU kernel of the platform compiled for) |
      "pallas_interpret" (the TPU kernel in the Pallas interpreter) | "auto" (the kernel on TPU
      and GPU, else xla).

  Returns:
    `out [batch, seq, heads, value_dim]` in q's dtype, and the float32 final state if
    `return_final_state`.
  """
  shape = check_qkv(q, k, v, same_length=True)
  per_token = (shape.batch, shape.q_len, shape.heads)
  if jnp.shape(beta) != per_token:
    raise ValueError(f"beta must be [batch, seq, heads] = {per_token}, got shape {jnp.shape(beta)}")
  if log_decay is None:
    log_decay = jnp.zeros(per_token, jnp.float32)
  elif jnp.shape(log_decay) != per_token:
    raise ValueError(
      f"log_decay must be [batch, seq, heads] = {per_token} or None, got shape "
      f"{jnp.shape(log_decay)}"
    )
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got chunk_size={chunk_size!r}")
  state_shape = (shape.batch, shape.heads, shape.head_dim, shape.value_dim)
  if initial_state is None:
    initial_state = jnp.zeros(state_shape, jnp.float32)
  elif jnp.shape(initial_state) != state_shape:
    raise ValueError(
      f"initial_state must be [batch, heads, key_dim, value_dim] = {state_shape}, got shape "
      f"{jnp.shape(initial_state)}"
    )
  out, final_state = registry.dispatch(
    IMPLS,
    impl,
    q,
    k,
    v,
    jnp.asarray(beta, jnp.float32),
    log_decay=jnp.asarray(log_decay, jnp.float32),
    carry=document_carry(segment_ids, shape.batch, shape.q_len),
    initial_state=jnp.asarray(initial_state, jnp.float32),
    scale=resolve_scale(scale, shape.head_dim),
    chunk_size=chunk_size,
  )
  out = out.astype(q.dtype)
  return (out, final_state) if return_final_state else out


def document_carry(segment_ids, batch: int, seq: int) -> jax.Array:
  """`[batch, seq]` bool: False where a document starts after the first token (the state
  entering it is dropped); None for `segment_ids=None`."""
  if segment_ids is None:
    return None
  segment_ids = jnp.asarray(segment_ids)
  if segment_ids.shape != (batch, seq) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(
      f"segment_ids must be integers [batch, seq] = ({batch}, {seq}), got shape "
      f"{segment_ids.shape} dtype {segment_ids.dtype}"
    )
  same = segment_ids[:, 1:] == segment_ids[:, :-1]
  return jnp.concatenate([jnp.ones((batch, 1), bool), same], axis=1)


def delta_rule_step(q_t, k_t, v_t, beta_t, state, *, log_decay_t=None, scale=None):
  """One decoding token in constant memory: the token after the one `state` ends with.

  Args:
    q_t: `[batch, heads, key_dim]`; `k_t [batch, kv_heads, key_dim]`,
      `v_t [batch, kv_heads, value_dim]`; `beta_t`, `log_decay_t [batch, heads]`.
    state: float32 `[batch, heads, key_dim, value_dim]`, e.g. the final state of
      `delta_rule_attention(..., return_final_state=True)`.

  Returns:
    (`o_t [batch, heads, value_dim]` in q_t's dtype, new float32 state).
  """
  for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
    if x.ndim != 3:
      raise ValueError(f"{name} must be [batch, heads, dim] (one token), got shape {x.shape}")
  one = functools.partial(jnp.expand_dims, axis=1)
  out, state = delta_rule_attention(
    one(q_t),
    one(k_t),
    one(v_t),
    one(beta_t),
    log_decay=None if log_decay_t is None else one(log_decay_t),
    scale=scale,
    initial_state=state,
    return_final_state=True,
    impl="reference",
  )
  return out[:, 0], state
