"""HaloNet blocked local self-attention (Vaswani et al. 2021, "Scaling Local Self-Attention
for Parameter Efficient Visual Backbones", arXiv 2103.12731): query blocks attend to their
block widened by a halo. A separable window mask run by `api.local_attention` (reference, XLA
tiles, Pallas kernel).
"""

from __future__ import annotations

import functools

import jax

from attnjax.ops.neighborhood import api, blockwise, window


def halo_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  block_size: int | tuple[int, ...] = 8,
  halo_size: int | tuple[int, ...] = 3,
  scale: float | None = None,
  impl: str = "auto",
  block_sizes: blockwise.BlockSizes | None = None,
) -> jax.Array:
  """HaloNet blocked local self-attention (Vaswani et al. 2021, arXiv 2103.12731).

  The spatial axes are cut into non-overlapping query blocks of `block_size`; every query of a
  block attends to the keys of the block widened by `halo_size` on each side. Halo positions
  outside the input are masked (not zero-padded keys), so border rows see fewer keys.

  Args:
    q: `[batch, *spatial, heads, head_dim]`, 1-3 spatial axes, each divisible by block_size.
    k, v: `[batch, *spatial, kv_heads, head_dim | value_dim]`.
    block_size, halo_size: int or one per spatial axis.

  Returns:
    `[batch, *spatial, heads, value_dim]`.
  """
  n = len(api.check_spatial_qkv(q, k, v))
  windows = tuple(
    window.Blocked(b, h)
    for b, h in zip(
      api.per_axis("block_size", block_size, n, int),
      api.per_axis("halo_size", halo_size, n, int),
      strict=True,
    )
  )
  return api.local_attention(
    q, k, v, windows=windows, scale=scale, impl=impl, block_sizes=block_sizes
  )


api.register_local(
  "halo",
  halo_attention,
  "Vaswani et al. 2021, Scaling Local Self-Attention (HaloNet, arXiv 2103.12731)",
  "query blocks attend to their block plus a halo",
  example=functools.partial(
    api.spatial_example, spatial=(6, 8), options={"block_size": (2, 4), "halo_size": 1}
  ),
)
