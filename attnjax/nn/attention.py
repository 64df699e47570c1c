"""`Attention`: the NNX mixer of softmax-family variants (projections + a registry op).

Multi-head attention (Vaswani et al. 2017, "Attention Is All You Need") with grouped-query
heads (Ainslie et al. 2023, "GQA"), optional rotary positions (`attnjax.nn.rope`) and optional
QK-norm (Dehghani et al. 2023, RMSNorm of queries and keys over head_dim). The attention
itself is the registered variant's op: `attnjax.registry.get(variant)(q, k, v, ...)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax import registry
from attnjax.nn import cache as cache_lib
from attnjax.nn import recycled, streaming, tidal
from attnjax.nn.norm import RMSNorm
from attnjax.nn.params import fan_in_init, param
from attnjax.nn.rope import apply_rope
from attnjax.nn.seq_parallel import SeqParallel, token_positions, variant_op
from attnjax.ops.softmax import cached


def resolve_heads(
  embed_dim: int, num_heads: int, num_kv_heads: int | None, head_dim: int | None
) -> tuple[int, int]:
  """(num_kv_heads, head_dim) with the mixer protocol's defaults, validated."""
  num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  head_dim = embed_dim // num_heads if head_dim is None else head_dim
  for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
    if value < 1:
      raise ValueError(f"{name} must be positive, got {name}={value}")
  if num_kv_heads < 1 or num_heads % num_kv_heads:
    raise ValueError(
      f"num_heads={num_heads} must be a positive multiple of num_kv_heads={num_kv_heads}"
    )
  if head_dim < 1:
    raise ValueError(
      f"head_dim must be positive, got head_dim={head_dim} (embed_dim={embed_dim}, "
      f"num_heads={num_heads})"
    )
  return num_kv_heads, head_dim


class Attention(nnx.Module):
  """Projections around a registered attention op: `[batch, seq, embed] -> same`.

  Parameters (logical axes): `q [embed, heads, head_dim]`, `k`, `v [embed, kv_heads,
  head_dim]`, `out [heads, head_dim, embed]`; with `qk_norm`, `q_norm`, `k_norm [head_dim]`.
  `variant_options` go to the variant's op on every call (e.g. `window=` of
  `sliding_window`); `impl` selects its implementation. With `seq_parallel` (see
  `attnjax.nn.seq_parallel`) the op runs with the sequence split over a mesh axis.
  """

  def __init__(
    self,
    embed_dim: int,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    variant: str = "softmax",
    rngs: nnx.Rngs,
    use_rope: bool = True,
    rope_base: float = 10_000.0,
    qk_norm: bool = False,
    impl: str = "auto",
    dtype=jnp.float32,
    seq_parallel: SeqParallel | None = None,
    **variant_options,
  ):
    num_kv_heads, head_dim = resolve_heads(embed_dim, num_heads, num_kv_heads, head_dim)
    if use_rope and head_dim % 2:
      raise ValueError(f"use_rope needs an even head_dim, got head_dim={head_dim}")
    registry.get(variant)  # Fails early, listing the registered names.
    self.variant = variant
    self.impl = impl
    self.seq_parallel = seq_parallel
    self.use_rope = use_rope
    self.rope_base = rope_base
    self.dtype = dtype
    self.variant_options = tuple(sorted(variant_options.items()))  # static, hashable
    self.q = param(
      rngs, fan_in_init(), (embed_dim, num_heads, head_dim), ("embed", "heads", "head_dim")
    )
    kv_axes = ("embed", "kv_heads", "head_dim")
    self.k = param(rngs, fan_in_init(), (embed_dim, num_kv_heads, head_dim), kv_axes)
    self.v = param(rngs, fan_in_init(), (embed_dim, num_kv_heads, head_dim), kv_axes)
    self.out = param(
      rngs, fan_in_init(2), (num_heads, head_dim, embed_dim), ("heads", "head_dim", "embed")
    )
    self.q_norm = RMSNorm(head_dim, axis_name="head_dim", rngs=rngs) if qk_norm else None
    self.k_norm = RMSNorm(head_dim, axis_name="head_dim", rngs=rngs) if qk_norm else None

  def project_qkv(
    self, x: jax.Array, positions: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`x [batch, seq, embed]` -> (x in compute dtype, q, k, v `[batch, seq, heads, dim]`).

    `positions` int32 `[seq]`: rotary positions of the rows (None: the sequence's own).
    """
    if x.ndim != 3 or x.shape[-1] != self.q.shape[0]:
      raise ValueError(f"x must be [batch, seq, embed={self.q.shape[0]}], got shape {x.shape}")
    x = x.astype(self.dtype)
    q, k, v = (
      jnp.einsum("btd,dhk->bthk", x, w[...].astype(self.dtype)) for w in (self.q, self.k, self.v)
    )
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.use_rope:
      # Positions restart nowhere: rotary scores depend on q_pos - kv_pos only, and packed
      # documents never attend across their boundary.
      if positions is None:
        positions = token_positions(x.shape[1], self.seq_parallel)
      q = apply_rope(q, positions, base=self.rope_base)
      k = apply_rope(k, positions, base=self.rope_base)
    return x, q, k, v

  def attend(self, q, k, v, *args, segment_ids=None, **kwargs) -> jax.Array:
    """The registered variant's op with this mixer's `impl` and static options.

    `segment_ids` reaches ops that declare them (`capabilities.segment_ids`); for any other
    op packed sequences are a `ValueError`.
    """
    options = {**dict(self.variant_options), **kwargs}
    if segment_ids is not None:
      if not registry.get(self.variant).capabilities.segment_ids:
        raise ValueError(
          f"variant {self.variant!r} does not take segment_ids (packed sequences); got "
          f"segment_ids of shape {segment_ids.shape}: pass segment_ids=None"
        )
      options["segment_ids"] = segment_ids
    op = variant_op(self.variant, self.seq_parallel)
    return op(q, k, v, *args, impl=self.impl, **options)

  def project_out(self, heads_out: jax.Array) -> jax.Array:
    """`[batch, seq, heads, head_dim]` -> `[batch, seq, embed]`."""
    return jnp.einsum("bthk,hkd->btd", heads_out, self.out[...].astype(self.dtype))

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    """`x [batch, seq, embed]`, `segment_ids` int `[batch, seq]` -> `[batch, seq, embed]`."""
    _, q, k, v = self.project_qkv(x)
    return self.project_out(self.attend(q, k, v, segment_ids=segment_ids))

  def _check_decodes(self) -> None:
    # A subclass with its own __call__ computes more than its op: it decodes only where it
    # says how (its own `decode`).
    own_decode = type(self).decode is not Attention.decode
    if type(self).__call__ is not Attention.__call__ and not own_decode:
      raise cache_lib.no_cache(self.variant)
    variant = registry.get(self.variant)
    if variant.capabilities.split != "mask" and variant.cached is None and not own_decode:
      raise cache_lib.no_cache(self.variant, "its op is not a mask of dot_product_attention")
    if self.seq_parallel is not None and self.seq_parallel.splits_sequence:
      raise cache_lib.no_cache(self.variant, "decoding does not split the sequence (seq_parallel)")

  def _keywords(self) -> dict:
    """The variant's attention keywords over absolute positions (its mask, scale, ...)."""
    variant = registry.get(self.variant)
    if variant.capabilities.split == "mask":
      return variant.preset(dict(self.variant_options), self.q.shape[1])
    return {**variant.defaults, **dict(self.variant_options)}

  def init_cache(self, batch: int, max_len: int, dtype, policy=None) -> dict:
    """Zero keys and values `[batch, rows, kv_heads, head_dim]` in `dtype`.

    `rows` is `max_len`, or the mask's lookback when smaller (a sliding window's or chunk's
    past keys): then the cache is a ring buffer, row `p % rows` holding position `p`.
    `policy`: a cache policy instead (`streaming.StreamingLLM`: sinks and a recent window;
    `recycled.RecycledAttention`: every key, attended in full only every few steps;
    `tidal.LayerRole`: this layer's part in `tidal.TidalDecode`).
    """
    self._check_decodes()
    _, kv_heads, head_dim = self.k.shape
    mask = self._keywords().get("mask")
    if policy is not None:
      if isinstance(policy, tidal.TidalDecode):
        raise ValueError(
          "TidalDecode chooses positions in some layers for the next ones: give it to "
          "DecoderLM.init_cache, which gives each softmax layer its tidal.LayerRole"
        )
      policies = streaming.StreamingLLM | recycled.RecycledAttention | tidal.LayerRole
      if not isinstance(policy, policies):
        raise ValueError(
          "policy must be a StreamingLLM, a RecycledAttention, a tidal.LayerRole or None, got "
          f"policy={policy!r}"
        )
      if mask is None:
        raise ValueError(f"variant {self.variant!r} has no mask a cache policy can restrict")
      if isinstance(policy, streaming.StreamingLLM):
        return streaming.init_cache(policy, batch, kv_heads, head_dim, dtype)
      if isinstance(policy, tidal.LayerRole):
        return tidal.init_cache(policy, batch, max_len, kv_heads, head_dim, dtype)
      heads = self.q.shape[1]
      return recycled.init_cache(policy, batch, max_len, heads, kv_heads, head_dim, dtype)
    return cache_lib.key_value_cache(mask, batch, max_len, kv_heads, head_dim, dtype)

  def decode(self, x: jax.Array, cache: dict, position: jax.Array) -> tuple[jax.Array, dict]:
    """`x [batch, n, embed]` at positions `position + [0, n)` -> (out, cache with its K/V)."""
    self._check_decodes()
    _, q, k, v = self.project_qkv(x, positions=position + jnp.arange(x.shape[1]))
    out, cache = self.cached_attend(q, k, v, cache, position)
    return self.project_out(out), cache

  def cached_attend(self, q, k, v, cache: dict, position: jax.Array, **extra):
    """(attention of the chunk `q, k, v` over the cache and itself, the cache holding them).

    `extra`: keywords of `cached_attention` beyond the variant's (`sinks`, `return_lse`).
    """
    keywords = {**self._keywords(), **extra}
    if streaming.is_streaming(cache):
      rope_base = self.rope_base if self.use_rope else None
      return streaming.attend(q, k, v, cache, position, keywords=keywords, rope_base=rope_base)
    if recycled.is_recycled(cache):
      return recycled.attend(q, k, v, cache, position, keywords=keywords)
    if tidal.is_tidal(cache):
      return tidal.attend(q, k, v, cache, position, keywords=keywords)
    attention = registry.get(self.variant).cached or cached.cached_attention
    return cache_lib.attend_and_store(q, k, v, cache, position, attention, keywords)
