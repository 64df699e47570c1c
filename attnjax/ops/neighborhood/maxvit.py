"""MaxViT multi-axis attention (Tu et al. 2022, "MaxViT: Multi-Axis Vision Transformer",
arXiv 2204.01697), one partition per call: block (local windows) or grid (dilated, global).
Its mixer (`attnjax.nn.local.MultiAxisAttention`) applies block attention, then grid
attention. Separable window masks run by `api.local_attention`.
"""

from __future__ import annotations

import functools

import jax

from attnjax.ops.neighborhood import api, blockwise, window


def maxvit_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  partition: str = "block",
  window_size: int | tuple[int, ...] = 7,
  scale: float | None = None,
  impl: str = "auto",
  block_sizes: blockwise.BlockSizes | None = None,
) -> jax.Array:
  """MaxViT multi-axis attention, one partition (Tu et al. 2022, arXiv 2204.01697).

  `partition="block"`: attention within non-overlapping windows of `window_size` positions
  per axis (local). `partition="grid"`: attention within a `window_size` grid per axis whose
  positions are `size // window_size` apart (sparse, global; dilated attention). The MaxViT
  block applies block attention, then grid attention (see `attnjax.nn.local`).

  Args:
    q: `[batch, *spatial, heads, head_dim]`; every spatial size divisible by window_size.
    k, v: `[batch, *spatial, kv_heads, head_dim | value_dim]`.

  Returns:
    `[batch, *spatial, heads, value_dim]`.
  """
  spatial = api.check_spatial_qkv(q, k, v)
  sizes = api.per_axis("window_size", window_size, len(spatial), int)
  if partition == "block":
    windows = tuple(window.Blocked(s) for s in sizes)
  elif partition == "grid":
    windows = tuple(window.Grid(s, n) for s, n in zip(sizes, spatial, strict=True))
  else:
    raise ValueError(f"partition must be 'block' or 'grid', got partition={partition!r}")
  return api.local_attention(
    q, k, v, windows=windows, scale=scale, impl=impl, block_sizes=block_sizes
  )


api.register_local(
  "maxvit",
  maxvit_attention,
  "Tu et al. 2022, MaxViT: Multi-Axis Vision Transformer (arXiv 2204.01697)",
  "block attention then grid (dilated) attention",
  module="attnjax.nn.local:MultiAxisAttention",
  example=functools.partial(
    api.spatial_example, spatial=(6, 8), options={"partition": "grid", "window_size": 2}
  ),
)
