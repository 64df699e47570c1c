"""NNX mixer of the delta-rule variants (`attnjax.ops.delta`): DeltaNet and Gated DeltaNet.

The layer of both papers (Yang et al. 2024, arXiv 2406.06484, Sec. 3.3; Yang, Kautz and
Hatamizadeh 2024, arXiv 2412.06464, Sec. 3.4), as the authors' code builds it:

    q, k, v = SiLU(ShortConv(X W_Q)), SiLU(ShortConv(X W_K)), SiLU(ShortConv(X W_V))
    q, k    = q / ||q||, k / ||k||          (per head; keeps I - beta k k^T a contraction)
    beta    = sigmoid(X W_beta)             [batch, seq, heads]
    log a   = -exp(A_log) softplus(X W_a + dt_bias)          (gated_deltanet only)
    O       = delta_rule(q, k, v, beta, log a)
    out     = (RMSNorm(O) * g) W_O,  g = SiLU(X W_g) for gated_deltanet, 1 for deltanet

RMSNorm is over each head's channels with a learned scale shared by the heads. The output gate
of DeltaNet is optional in the authors' code and off by default; here it is off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax import registry
from attnjax.nn.attention import resolve_heads
from attnjax.nn.cache import no_cache
from attnjax.nn.norm import rms_normalize
from attnjax.nn.params import fan_in_init, param
from attnjax.nn.seq_parallel import SeqParallel, variant_op
from attnjax.ops.delta import conv, gated

# Width of the short convolutions (the authors' code's default).
CONV_WIDTH = 4


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """`x / ||x||` over the last axis, computed in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _heads_init(init):
  """A `param` initializer from `init(key, heads)`."""
  return lambda key, shape, dtype: init(key, shape[0]).astype(dtype)


class DeltaNet(nnx.Module):
  """DeltaNet / Gated DeltaNet token mixer: `[batch, seq, embed] -> same` (module docstring).

  Parameters (logical axes): `q [embed, heads, head_dim]`, `k`, `v [embed, kv_heads, head_dim]`,
  their short convolutions `q_conv`, `k_conv`, `v_conv [width, channels]`, `beta [embed,
  heads]`, `norm [head_dim]`, `out [heads, head_dim, embed]`; for gated_deltanet also
  `decay [embed, heads]` (`W_a`), `a_log`, `dt_bias [heads]`, `gate [embed, heads,
  head_dim]` (`W_g`). Options: `chunk_size`, `conv_width`. Packed sequences (`segment_ids`)
  restart the convolutions and the recurrence at each document.
  """

  def __init__(
    self,
    embed_dim: int,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    variant: str = "deltanet",
    rngs: nnx.Rngs,
    impl: str = "auto",
    dtype=jnp.float32,
    seq_parallel: SeqParallel | None = None,
    chunk_size: int = 64,
    conv_width: int = CONV_WIDTH,
  ):
    mixer = registry.mixer_class(variant)  # Fails early, listing the registered names.
    if mixer is not type(self):
      raise ValueError(f"DeltaNet does not serve variant {variant!r}; its mixer is {mixer}")
    if conv_width < 1:
      raise ValueError(f"conv_width must be positive, got conv_width={conv_width}")
    num_kv_heads, head_dim = resolve_heads(embed_dim, num_heads, num_kv_heads, head_dim)
    self.variant, self.impl, self.dtype = variant, impl, dtype
    self.seq_parallel, self.chunk_size = seq_parallel, chunk_size
    self.gated = variant == "gated_deltanet"
    heads_axes, kv_axes = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim")
    self.q = param(rngs, fan_in_init(), (embed_dim, num_heads, head_dim), heads_axes)
    self.k = param(rngs, fan_in_init(), (embed_dim, num_kv_heads, head_dim), kv_axes)
    self.v = param(rngs, fan_in_init(), (embed_dim, num_kv_heads, head_dim), kv_axes)
    conv_init = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=0)
    for name, heads in (("q_conv", num_heads), ("k_conv", num_kv_heads), ("v_conv", num_kv_heads)):
      setattr(self, name, param(rngs, conv_init, (conv_width, heads * head_dim), (None, None)))
    self.beta = param(rngs, fan_in_init(), (embed_dim, num_heads), ("embed", "heads"))
    self.norm = param(rngs, nnx.initializers.ones, (head_dim,), ("head_dim",))
    self.out = param(
      rngs, fan_in_init(2), (num_heads, head_dim, embed_dim), ("heads", "head_dim", "embed")
    )
    if self.gated:
      self.decay = param(rngs, fan_in_init(), (embed_dim, num_heads), ("embed", "heads"))
      self.a_log = param(rngs, _heads_init(gated.init_a_log), (num_heads,), ("heads",))
      self.dt_bias = param(rngs, _heads_init(gated.init_dt_bias), (num_heads,), ("heads",))
      self.gate = param(rngs, fan_in_init(), (embed_dim, num_heads, head_dim), heads_axes)

  def _conv_features(self, x, weight: nnx.Param, conv_weight: nnx.Param, segment_ids, before):
    """(SiLU(ShortConv(x W)) `[batch, seq, heads, head_dim]`, the last `width - 1` inputs).

    `before` `[batch, width - 1, channels]`: the inputs preceding `x` (decoding; None: none).
    """
    projected = jnp.einsum("btd,dhk->bthk", x, weight[...].astype(self.dtype))
    flat = projected.reshape(*projected.shape[:2], -1)
    width = conv_weight.shape[0]
    if before is not None:
      flat = jnp.concatenate([before.astype(flat.dtype), flat], axis=1)
    mixed = conv.short_convolution(flat, conv_weight[...].astype(self.dtype), segment_ids)
    mixed = mixed[:, flat.shape[1] - x.shape[1] :]
    return jax.nn.silu(mixed).reshape(projected.shape), flat[:, flat.shape[1] - (width - 1) :]

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    """`x [batch, seq, embed]` -> `[batch, seq, embed]`."""
    return self._forward(x, segment_ids, None)[0]

  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    """Zero delta-rule state `[batch, heads, head_dim, head_dim]` (float32) and the inputs of
    the three short convolutions `[batch, conv_width - 1, channels]` before the first token."""
    del max_len
    self._check_decodes()
    _, heads, head_dim = self.q.shape
    kv_heads = self.k.shape[1]
    width = self.q_conv.shape[0]
    return {
      "state": jnp.zeros((batch, heads, head_dim, head_dim), jnp.float32),
      "conv": tuple(
        jnp.zeros((batch, width - 1, n * head_dim), dtype) for n in (heads, kv_heads, kv_heads)
      ),
    }

  def decode(self, x: jax.Array, cache: dict, position: jax.Array) -> tuple[jax.Array, dict]:
    """`x [batch, n, embed]` after the cache's tokens -> (out, cache); `position` unused."""
    del position
    self._check_decodes()
    return self._forward(x, None, cache)

  def _check_decodes(self) -> None:
    if self.seq_parallel is not None and self.seq_parallel.splits_sequence:
      raise no_cache(self.variant, "decoding does not split the sequence (seq_parallel)")

  def _forward(self, x, segment_ids, cache) -> tuple[jax.Array, dict | None]:
    if x.ndim != 3 or x.shape[-1] != self.q.shape[0]:
      raise ValueError(f"x must be [batch, seq, embed={self.q.shape[0]}], got shape {x.shape}")
    x = x.astype(self.dtype)
    befores = (None, None, None) if cache is None else cache["conv"]
    (q, q_last), (k, k_last), (v, v_last) = (
      self._conv_features(x, weight, conv_weight, segment_ids, before)
      for weight, conv_weight, before in zip(
        (self.q, self.k, self.v), (self.q_conv, self.k_conv, self.v_conv), befores, strict=True
      )
    )
    q, k = _l2_normalize(q), _l2_normalize(k)
    keywords = {"beta": jax.nn.sigmoid(x @ self.beta[...].astype(self.dtype))}
    if self.gated:
      logits = x @ self.decay[...].astype(self.dtype)
      keywords["log_decay"] = gated.gated_delta_log_decay(
        logits, self.a_log[...], self.dt_bias[...]
      )
    if segment_ids is not None:
      keywords["segment_ids"] = segment_ids
    op = variant_op(self.variant, self.seq_parallel)
    new_cache = None
    if cache is None:
      o = op(q, k, v, impl=self.impl, chunk_size=self.chunk_size, **keywords)
    else:
      o, state = op(
        q, k, v, impl=self.impl, chunk_size=self.chunk_size, initial_state=cache["state"],
        return_final_state=True, **keywords,
      )  # fmt: skip
      new_cache = {"state": state, "conv": (q_last, k_last, v_last)}
    o = rms_normalize(o) * self.norm[...].astype(o.dtype)
    if self.gated:
      o = o * jax.nn.silu(jnp.einsum("btd,dhk->bthk", x, self.gate[...].astype(self.dtype)))
    return jnp.einsum("bthk,hkd->btd", o, self.out[...].astype(self.dtype)), new_cache
