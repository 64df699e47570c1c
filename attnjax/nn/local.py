"""NNX mixers of the local-attention variants (neighborhood, halo, maxvit, biformer).

`LocalAttention` projects `[batch, seq, embed]` tokens to heads, views the sequence as a
`spatial_shape` grid (row-major; None: a 1-D sequence), calls the registered op and projects
back. `MultiAxisAttention` is MaxViT's pair of sublayers: block attention, then grid attention.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax import masks, registry
from attnjax.nn import cache as cache_lib
from attnjax.nn.attention import resolve_heads
from attnjax.nn.norm import RMSNorm
from attnjax.nn.params import fan_in_init, param
from attnjax.nn.rope import apply_rope
from attnjax.nn.seq_parallel import SeqParallel, token_positions, variant_op
from attnjax.ops.softmax import cached


class LocalAttention(nnx.Module):
  """Projections around a registered local-attention op: `[batch, seq, embed] -> same`.

  Parameters (logical axes): `q [embed, heads, head_dim]`, `k`, `v [embed, kv_heads,
  head_dim]`, `out [heads, head_dim, embed]`. `spatial_shape` (e.g. `(h, w)` for an image of
  `h * w` patch tokens) must multiply to the sequence length; None treats the sequence as one
  axis of a language model: `use_rope` (default on for 1-D) adds rotary positions and
  `neighborhood` is causal unless `causal` is given. `variant_options` go to the op on
  every call (e.g. `kernel_size=7, dilation=2` for `neighborhood`).

  `local_context=n` adds BiFormer's local context enhancement (Zhu et al. 2023): a depthwise
  `n`-wide convolution of v over the grid, added to the attention output per head (parameter
  `lce [*n, kv_heads, head_dim]`); 0 turns it off. It needs a grid (`spatial_shape`): on a 1-D
  causal sequence it would read future tokens.
  """

  def __init__(
    self,
    embed_dim: int,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    variant: str = "neighborhood",
    rngs: nnx.Rngs,
    spatial_shape: tuple[int, ...] | None = None,
    use_rope: bool | None = None,
    rope_base: float = 10_000.0,
    impl: str = "auto",
    dtype=jnp.float32,
    local_context: int = 0,
    seq_parallel: SeqParallel | None = None,
    **variant_options,
  ):
    num_kv_heads, head_dim = resolve_heads(embed_dim, num_heads, num_kv_heads, head_dim)
    if local_context and (spatial_shape is None or local_context < 0 or local_context % 2 == 0):
      raise ValueError(
        f"local_context must be 0 or an odd kernel width with a spatial_shape grid, got "
        f"local_context={local_context}, spatial_shape={spatial_shape}"
      )
    if registry.get(variant).family != "neighborhood":
      raise ValueError(f"LocalAttention runs local-attention variants, got variant={variant!r}")
    self.spatial_shape = None if spatial_shape is None else tuple(spatial_shape)
    self.use_rope = spatial_shape is None if use_rope is None else use_rope
    if self.use_rope and (spatial_shape is not None or head_dim % 2):
      raise ValueError(
        f"use_rope needs a 1-D sequence (spatial_shape=None) and an even head_dim, got "
        f"spatial_shape={spatial_shape}, head_dim={head_dim}"
      )
    self.variant = variant
    self.impl = impl
    self.rope_base = rope_base
    self.dtype = dtype
    self.seq_parallel = seq_parallel
    if spatial_shape is None and variant == "neighborhood":
      variant_options.setdefault("causal", True)
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
    grid = 0 if spatial_shape is None else len(spatial_shape)
    self.lce = (
      param(
        rngs,
        fan_in_init(grid),
        (*(local_context,) * grid, num_kv_heads, head_dim),
        (*(None,) * grid, "kv_heads", "head_dim"),
      )
      if local_context
      else None
    )

  def _local_context(self, v: jax.Array, heads: int) -> jax.Array:
    """Depthwise convolution of `v [b, *grid, kv_heads, d]` -> `[b, *grid, heads, d]`."""
    grid = v.ndim - 3
    letters = "DHW"[3 - grid :]
    channels = v.shape[-2] * v.shape[-1]
    kernel = self.lce[...].astype(self.dtype).reshape(*self.lce.shape[:grid], 1, channels)
    out = jax.lax.conv_general_dilated(
      v.reshape(*v.shape[:-2], channels),
      kernel,
      window_strides=(1,) * grid,
      padding="SAME",
      dimension_numbers=(f"N{letters}C", f"{letters}IO", f"N{letters}C"),
      feature_group_count=channels,
    )
    return jnp.repeat(out.reshape(v.shape), heads // v.shape[-2], axis=-2)

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    """`x [batch, seq, embed]` -> `[batch, seq, embed]`; packed sequences are not supported."""
    if segment_ids is not None:
      raise ValueError(f"variant {self.variant!r} does not support segment_ids (packed input)")
    if x.ndim != 3 or x.shape[-1] != self.q.shape[0]:
      raise ValueError(f"x must be [batch, seq, embed={self.q.shape[0]}], got shape {x.shape}")
    spatial = self.spatial_shape or (x.shape[1],)
    if math.prod(spatial) != x.shape[1]:
      raise ValueError(
        f"x has {x.shape[1]} tokens but spatial_shape={spatial} needs {math.prod(spatial)}"
      )
    x = x.astype(self.dtype)
    q, k, v = (
      jnp.einsum("btd,dhk->bthk", x, w[...].astype(self.dtype)) for w in (self.q, self.k, self.v)
    )
    if self.use_rope:
      positions = token_positions(x.shape[1], self.seq_parallel)
      q = apply_rope(q, positions, base=self.rope_base)
      k = apply_rope(k, positions, base=self.rope_base)
    q, k, v = (t.reshape(t.shape[0], *spatial, *t.shape[2:]) for t in (q, k, v))
    op = variant_op(self.variant, self.seq_parallel)
    out = op(q, k, v, impl=self.impl, **dict(self.variant_options))
    if self.lce is not None:
      out = out + self._local_context(v, q.shape[-2]).astype(out.dtype)
    out = out.reshape(x.shape[0], x.shape[1], *out.shape[-2:])
    return jnp.einsum("bthk,hkd->btd", out, self.out[...].astype(self.dtype))

  def _decode_keywords(self) -> dict:
    """`cached_attention` keywords of a causal 1-D neighborhood: its window of `kernel_size`
    dilation-group members at or before each query, as a mask over absolute positions."""
    options = dict(self.variant_options)
    if self.variant != "neighborhood" or self.spatial_shape is not None:
      raise cache_lib.no_cache(self.variant, "only causal 1-D neighborhood attention decodes")
    if not np.all(options.get("causal")):
      raise cache_lib.no_cache(self.variant, "the layer is not causal (causal=False)")
    if self.seq_parallel is not None and self.seq_parallel.splits_sequence:
      raise cache_lib.no_cache(self.variant, "decoding does not split the sequence (seq_parallel)")
    size, dilation = (
      int(np.ravel(options.get(name, 1))[0]) for name in ("kernel_size", "dilation")
    )
    mask = masks.causal() & masks.sliding_window((size - 1) * dilation)
    if dilation > 1:
      mask = mask & masks.strided(dilation)
    return {"mask": mask, "scale": options.get("scale")}

  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    """A ring of the last `(kernel_size - 1) * dilation` keys and values (causal 1-D only)."""
    mask = self._decode_keywords()["mask"]
    _, kv_heads, head_dim = self.k.shape
    return cache_lib.key_value_cache(mask, batch, max_len, kv_heads, head_dim, dtype)

  def decode(self, x: jax.Array, cache: dict, position: jax.Array) -> tuple[jax.Array, dict]:
    """`x [batch, n, embed]` at positions `position + [0, n)` -> (out, cache with its K/V)."""
    keywords = self._decode_keywords()
    x = x.astype(self.dtype)
    q, k, v = (
      jnp.einsum("btd,dhk->bthk", x, w[...].astype(self.dtype)) for w in (self.q, self.k, self.v)
    )
    if self.use_rope:
      positions = position + jnp.arange(x.shape[1])
      q = apply_rope(q, positions, base=self.rope_base)
      k = apply_rope(k, positions, base=self.rope_base)
    out, cache = cache_lib.attend_and_store(
      q, k, v, cache, position, cached.cached_attention, keywords
    )
    return jnp.einsum("bthk,hkd->btd", out, self.out[...].astype(self.dtype)), cache


class MultiAxisAttention(nnx.Module):
  """MaxViT multi-axis attention (Tu et al. 2022, arXiv 2204.01697) as one mixer.

  Block attention over `window_size` windows, then grid attention over a `window_size` grid,
  each a pre-norm residual sublayer with its own projections:
  `h = x + block(x)`, result `h + grid(norm(h)) - x` (the update; the enclosing block adds x).
  """

  def __init__(
    self,
    embed_dim: int,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    variant: str = "maxvit",
    rngs: nnx.Rngs,
    spatial_shape: tuple[int, ...],
    window_size: int | tuple[int, ...] = 7,
    impl: str = "auto",
    dtype=jnp.float32,
    seq_parallel: SeqParallel | None = None,
  ):
    shared = dict(
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      variant=variant,
      rngs=rngs,
      spatial_shape=spatial_shape,
      window_size=window_size,
      impl=impl,
      dtype=dtype,
      seq_parallel=seq_parallel,
    )
    self.block = LocalAttention(embed_dim, partition="block", **shared)
    self.grid_norm = RMSNorm(embed_dim, rngs=rngs)
    self.grid = LocalAttention(embed_dim, partition="grid", **shared)

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
    """`x [batch, seq, embed]` -> the update `[batch, seq, embed]`."""
    block_update = self.block(x, segment_ids=segment_ids)
    hidden = x + block_update.astype(x.dtype)
    return block_update + self.grid(self.grid_norm(hidden), segment_ids=segment_ids)
