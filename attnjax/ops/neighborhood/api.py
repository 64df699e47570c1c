"""`neighborhood_attention` and `local_attention`: local softmax attention over 1-3 spatial axes.

Both validate their arguments, turn them into per-axis windows (`window.py`) and dispatch by
`impl=` over the same table: "reference" (dense masked, float32), "xla" (tiled, custom VJP),
"pallas" / "pallas_interpret" (the fused kernel of `kernels_pallas.neighborhood`).
"""

from __future__ import annotations

import functools
import math

import jax

from attnjax import registry
from attnjax.ops.neighborhood import blockwise, pallas, reference, window
from attnjax.ops.qkv import check_qkv, resolve_scale

IMPLS = {
  "reference": reference.attention,
  "xla": blockwise.attention,
  "pallas": pallas.attention,
  "pallas_interpret": pallas.attention_interpret,
}


def neighborhood_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  kernel_size: int | tuple[int, ...],
  dilation: int | tuple[int, ...] = 1,
  causal: bool | tuple[bool, ...] = False,
  scale: float | None = None,
  impl: str = "auto",
  block_sizes: blockwise.BlockSizes | None = None,
) -> jax.Array:
  """Neighborhood attention (NATTEN semantics) over `[batch, *spatial, heads, head_dim]`.

  Hassani et al. 2023, "Neighborhood Attention Transformer" (arXiv 2204.07143); dilation from
  Hassani & Shi 2022, "Dilated Neighborhood Attention Transformer" (arXiv 2209.15001).
  Along every axis a query attends to exactly `kernel_size` neighbors of its dilation group
  (`position % dilation`), centered on it and shifted inward at the borders, so every query
  sees the same number of keys; with `causal` on an axis, only neighbors at or before it.

  Args:
    q: `[batch, *spatial, heads, head_dim]` with 1, 2 or 3 spatial axes.
    k: `[batch, *spatial, kv_heads, head_dim]`; `heads % kv_heads == 0` (GQA by shape).
    v: `[batch, *spatial, kv_heads, value_dim]`.
    kernel_size: odd window size, one int for every axis or one per axis.
    dilation: int or per-axis; `kernel_size * dilation` must not exceed the axis size.
    causal: bool or per-axis (causal on every axis: position t reads no later position).
    scale: logit scale; None means `head_dim ** -0.5`.
    impl: "reference" | "xla" | "pallas" | "pallas_interpret" | "auto".
    block_sizes: tile shape of the tiled implementations (None: a default per impl).

  Returns:
    `[batch, *spatial, heads, value_dim]` in q's dtype.
  """
  spatial = check_spatial_qkv(q, k, v)
  n = len(spatial)
  windows = tuple(
    window.Neighborhood(size, dil, axis_causal)
    for size, dil, axis_causal in zip(
      per_axis("kernel_size", kernel_size, n, int),
      per_axis("dilation", dilation, n, int),
      per_axis("causal", causal, n, bool),
      strict=True,
    )
  )
  return local_attention(q, k, v, windows=windows, scale=scale, impl=impl, block_sizes=block_sizes)


def local_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  windows: tuple[window.AxisWindow, ...],
  scale: float | None = None,
  impl: str = "auto",
  block_sizes: blockwise.BlockSizes | None = None,
) -> jax.Array:
  """Softmax attention under the separable mask `windows` (one `window.AxisWindow` per axis).

  The shared entry point of neighborhood, HaloNet and MaxViT attention; shapes and `impl` as
  in `neighborhood_attention`.
  """
  spatial = check_spatial_qkv(q, k, v)
  if len(windows) != len(spatial):
    raise ValueError(f"need one window per spatial axis {spatial}, got {len(windows)} windows")
  for axis, (length, axis_window) in enumerate(zip(spatial, windows, strict=True)):
    axis_window.check(length, axis)
  return registry.dispatch(
    IMPLS,
    impl,
    q,
    k,
    v,
    windows=tuple(windows),
    scale=resolve_scale(scale, q.shape[-1]),
    block_sizes=block_sizes,
  )


def check_spatial_qkv(q, k, v) -> tuple[int, ...]:
  """Validates `[batch, *spatial, heads, dim]` inputs with 1-3 equal spatial axes."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not 4 <= x.ndim <= 6:
      raise ValueError(
        f"{name} must be [batch, *spatial, heads, head_dim] with 1 to 3 spatial axes, got "
        f"shape {x.shape}"
      )
  spatial = q.shape[1:-2]
  for name, x in (("k", k), ("v", v)):
    if x.shape[1:-2] != spatial:
      raise ValueError(
        f"{name} must have q's spatial shape {spatial} ([batch, *spatial, heads, dim]), got "
        f"shape {x.shape}"
      )
  flat = [x.reshape(x.shape[0], -1, *x.shape[-2:]) for x in (q, k, v)]
  check_qkv(*flat)
  return spatial


def per_axis(name: str, value, n: int, kind: type) -> tuple:
  values = tuple(value) if isinstance(value, tuple | list) else (value,) * n
  if len(values) != n:
    raise ValueError(f"{name} needs 1 or {n} values (one per spatial axis), got {name}={value!r}")
  for x in values:
    ok = isinstance(x, bool) if kind is bool else isinstance(x, int) and not isinstance(x, bool)
    if not ok:
      raise ValueError(f"{name} must be {kind.__name__} or a tuple of them, got {name}={value!r}")
  return values


def register_local(
  name, op, paper, description, *, module="attnjax.nn.local:LocalAttention", **options
):
  """Registers a bidirectional local-attention variant on `[batch, *spatial, heads, dim]`."""
  registry.register(
    name,
    op,
    family="neighborhood",
    paper=paper,
    description=description,
    module=module,
    **{
      "capabilities": registry.Capabilities(causal=False, bidirectional=True, spatial=True),
      "impls": tuple(IMPLS),
      "example": spatial_example,
      **options,
    },
  )


def spatial_example(
  key, *, batch, seq, heads, kv_heads, head_dim, spatial=None, options=None
) -> tuple[tuple, dict]:
  """Random q, k, v on a 2-D grid of about `seq` tokens (or on `spatial`), and `options`."""
  rows = max(2, math.isqrt(seq))
  spatial = spatial or (rows, seq // rows)
  k_q, k_k, k_v = jax.random.split(key, 3)
  return (
    jax.random.normal(k_q, (batch, *spatial, heads, head_dim)),
    jax.random.normal(k_k, (batch, *spatial, kv_heads, head_dim)),
    jax.random.normal(k_v, (batch, *spatial, kv_heads, head_dim)),
  ), dict(options or {})


register_local(
  "neighborhood",
  neighborhood_attention,
  "Hassani et al. 2023, Neighborhood Attention Transformer (arXiv 2204.07143)",
  "NATTEN neighborhoods in 1-3 D: kernel_size, dilation, causal per axis",
  defaults={"kernel_size": 7},
  capabilities=registry.Capabilities(
    causal=True, bidirectional=True, causal_keyword=True, spatial=True
  ),
  example=functools.partial(
    spatial_example, spatial=(7, 9), options={"kernel_size": (3, 5), "dilation": (2, 1)}
  ),
)
