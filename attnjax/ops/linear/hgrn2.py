"""HGRN2 (Qin et al. 2024, "HGRN2: Gated Linear RNNs with State Expansion", arXiv 2404.07904):
HGRN's lower-bounded forget gate with its state expanded by an outer product, which makes the
recurrence a gated linear attention.

The paper's HGRU2 recurrence (Eq. 3), per head, with row vectors `f_t, o_t` of size `d`
(`key_dim`) and `i_t` of size `e` (`value_dim`):

    f_t = beta + (1 - beta) * sigmoid(x_t W_f)                    forget gate    [d]
    h_t = Diag{f_t} h_{t-1} + (1 - f_t)^T i_t                      state          [d, e]
    y_t = o_t h_t                                                  output         [e]

`i_t` is the input, `o_t` the output gate and `beta` the layer's lower bound, which HGRN (Qin
et al. 2023, arXiv 2311.04823) makes increase with depth from 0 in the first layer. As linear
attention, `o_t` is the query, `1 - f_t` the key, `i_t` the value and `f_t` a vector decay
over the key channels: the op is `linear_attention(o, 1 - f, i, log_decay=log f)`, so every
implementation, the one-token `step` and LASP-2 / ZeCO (through `hgrn2_keywords`) run it.

Interpretations:
- `forget_logits` is `x_t W_f`; `lower_bound` (`beta`) is a float or one bound per forget
  channel `[kv_heads, key_dim]` (the authors' code learns one per channel); it must lie in
  `[0, 1)`.
- The key `1 - f_t` is the op's `k` argument, `hgrn2_keys(forget_logits, lower_bound)`.
  Linear-family ops take their keys positionally and a preset sees only keywords, so the key
  cannot be derived inside the call that sequence parallelism hands to `linear_attention`;
  another `k` gives the same lower-bounded gated recurrence with keys untied from the gate.
- `scale` multiplies `o_t`; None means `key_dim ** -0.5`, as in the authors' GLA-kernel
  implementation (the paper's equation has no scale; the RMSNorm that follows the op in the
  layer cancels it up to its epsilon).
- GQA by shape: the forget gate (`k`, `forget_logits`, `lower_bound`) and the input `v` have
  `kv_heads`; each group of query heads shares its forget gate and input.
- The activations of `o_t` and `i_t`, the output norm and projection belong to the layer
  (`attnjax.nn.linear.HGRN2Attention`), not to the op.

`log f_t` is computed in float32 from the logits, never from the `k` passed in: as
`log1p(-(1 - beta) sigmoid(-z))` where `f_t >= 1/2` (exact for the long memories of upper
layers), below that as the log of f's positive terms `(e^z + beta) / (1 + e^z)`, floored at
the smallest normal float32. It is finite and `<= 0` for every logit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.ops.linear import api
from attnjax.ops.qkv import check_qkv

# Where log f switches from log1p(-k) (accurate for k <= 1/2) to the log of f's own terms.
_KEY_SWITCH = 0.5


def _lower_bound(lower_bound, forget_shape: tuple[int, ...]) -> jax.Array:
  """`lower_bound` as float32, shape () or `[kv_heads, key_dim]`; a ValueError otherwise."""
  if isinstance(lower_bound, int | float) and not 0.0 <= lower_bound < 1.0:
    raise ValueError(f"lower_bound must lie in [0, 1), got lower_bound={lower_bound}")
  shape = jnp.shape(lower_bound)
  if shape not in ((), tuple(forget_shape[2:])):
    raise ValueError(
      f"lower_bound must be a float or [kv_heads, key_dim] = {tuple(forget_shape[2:])} like "
      f"forget_logits {tuple(forget_shape)}, got shape {shape}"
    )
  return jnp.asarray(lower_bound, jnp.float32)


def _check_forget_logits(forget_logits) -> tuple[int, ...]:
  shape = tuple(jnp.shape(forget_logits))
  if len(shape) != 4:
    raise ValueError(f"forget_logits must be [batch, seq, kv_heads, key_dim], got shape {shape}")
  return shape


def hgrn2_keys(forget_logits: jax.Array, lower_bound=0.0) -> jax.Array:
  """The keys `1 - f_t = (1 - beta) * sigmoid(-forget_logits)`, in forget_logits' dtype.

  Args:
    forget_logits: `[batch, seq, kv_heads, key_dim]`, `x_t W_f`.
    lower_bound: `beta`, a float or `[kv_heads, key_dim]`, in `[0, 1)`.

  Returns:
    `[batch, seq, kv_heads, key_dim]`, in `[0, 1 - beta]`; computed in float32 without the
    cancellation of `1 - f_t` where `f_t` is near 1.
  """
  shape = _check_forget_logits(forget_logits)
  beta = _lower_bound(lower_bound, shape)
  logits = jnp.asarray(forget_logits)
  keys = (1.0 - beta) * jax.nn.sigmoid(-logits.astype(jnp.float32))
  return keys.astype(logits.dtype)


def hgrn2_log_forget(forget_logits: jax.Array, lower_bound=0.0) -> jax.Array:
  """`log f_t = log(beta + (1 - beta) sigmoid(forget_logits))`, float32, finite and `<= 0`.

  Args:
    forget_logits: `[batch, seq, kv_heads, key_dim]`, `x_t W_f`.
    lower_bound: `beta`, a float or `[kv_heads, key_dim]`, in `[0, 1)`.

  Returns:
    float32 `[batch, seq, kv_heads, key_dim]`.
  """
  shape = _check_forget_logits(forget_logits)
  beta = _lower_bound(lower_bound, shape)
  logits = jnp.asarray(forget_logits).astype(jnp.float32)
  keys = (1.0 - beta) * jax.nn.sigmoid(-logits)
  # f = 1 - k: log1p(-k) is exact while k <= 1/2 (f >= 1/2, all memories worth keeping).
  # Below, f = (e^z + beta) / (1 + e^z) with z < 0 is a ratio of positive terms; its floor at
  # the smallest normal float keeps the log finite when beta = 0 and e^z underflows.
  near_one = keys <= _KEY_SWITCH
  log_near_one = jnp.log1p(-jnp.where(near_one, keys, 0.0))
  negative = jnp.minimum(logits, 0.0)
  numerator = jnp.maximum(jnp.exp(negative) + beta, np.finfo(np.float32).tiny)
  log_small = jnp.log(numerator) - jax.nn.softplus(negative)
  return jnp.where(near_one, log_near_one, log_small)


def hgrn2_keywords(kwargs: dict, heads: int) -> dict:
  """`linear_attention` keywords equal to a `hgrn2_attention` call's keywords `kwargs`.

  `heads` is the number of query heads: each query head decays by its group's forget gate.
  """
  kwargs = dict(kwargs)
  if "log_decay" in kwargs:
    raise ValueError("hgrn2_attention computes its log_decay from forget_logits; do not pass one")
  if "forget_logits" not in kwargs:
    raise ValueError("hgrn2_attention needs forget_logits [batch, seq, kv_heads, key_dim]")
  forget_logits = kwargs.pop("forget_logits")
  log_forget = hgrn2_log_forget(forget_logits, kwargs.pop("lower_bound", 0.0))
  kv_heads = log_forget.shape[2]
  if heads % kv_heads:
    raise ValueError(
      f"query heads ({heads}) must be a multiple of the kv_heads of forget_logits "
      f"{tuple(jnp.shape(forget_logits))}"
    )
  return {**kwargs, "log_decay": jnp.repeat(log_forget, heads // kv_heads, axis=2)}


def hgrn2_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  forget_logits: jax.Array,
  lower_bound=0.0,
  scale: float | None = None,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  chunk_size: int = 64,
  causal: bool = True,
  impl: str = "auto",
):
  """HGRN2's recurrence over `[batch, seq, heads, dim]` (see the module docstring).

  Args:
    q: `[batch, seq, heads, key_dim]`, the output gates `o_t`.
    k: `[batch, seq, kv_heads, key_dim]`, the keys `1 - f_t`:
      `hgrn2_keys(forget_logits, lower_bound)`; `heads % kv_heads == 0` (GQA by shape).
    v: `[batch, seq, kv_heads, value_dim]`, the inputs `i_t`.
    forget_logits: `[batch, seq, kv_heads, key_dim]` like k, `x_t W_f` of the forget gate.
    lower_bound: `beta` of `f_t = beta + (1 - beta) sigmoid(forget_logits)`: a float or
      `[kv_heads, key_dim]` (may be traced, e.g. learned), in `[0, 1)`.
    scale: multiplies q; None means `key_dim ** -0.5`.
    initial_state, return_final_state, chunk_size, causal, impl: as `linear_attention`
      (state `[batch, heads, key_dim, value_dim]` float32).

  Returns:
    `out [batch, seq, heads, value_dim]` in q's dtype, and the final state if
    `return_final_state`.
  """
  check_qkv(q, k, v, same_length=True)
  if jnp.shape(forget_logits) != k.shape:
    raise ValueError(
      f"forget_logits must be [batch, seq, kv_heads, key_dim] = {k.shape} like k, got shape "
      f"{jnp.shape(forget_logits)}"
    )
  keywords = hgrn2_keywords(
    dict(
      forget_logits=forget_logits,
      lower_bound=lower_bound,
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
