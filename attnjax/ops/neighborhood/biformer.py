"""BiFormer bi-level routing attention (Zhu et al. 2023, "BiFormer: Vision Transformer with
Bi-Level Routing Attention", arXiv 2303.08125): region top-k routing, then token attention over
the union of the routed regions. The mask depends on the data, so the fast form gathers the
routed regions per query region (a per-query-block dynamic block list) in pure JAX.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import registry
from attnjax.ops.neighborhood import api, window
from attnjax.ops.qkv import resolve_scale


def route_regions(q: jax.Array, k: jax.Array, *, region_size, topk: int) -> jax.Array:
  """BiFormer region-level routing: int32 `[batch, num_regions, topk]` routed key regions.

  Regions are the non-overlapping `region_size` blocks (row-major region order); the affinity
  of regions `i, j` is `mean_q(i) . mean_k(j)` summed over heads (a query head is paired with
  its GQA kv head). Routing selects indices, which carry no gradient. Arguments as in
  `biformer_attention`, which validates them.
  """
  plan = _region_plan(q.shape[1:-2], region_size)
  q_regions = window.to_tiles(q, plan).astype(jnp.float32).mean(2)  # [b, regions, h, d]
  k_regions = window.to_tiles(k, plan).astype(jnp.float32).mean(2)  # [b, regions, hk, d]
  kv_heads = k.shape[-2]
  q_regions = q_regions.reshape(*q_regions.shape[:2], kv_heads, -1, q.shape[-1]).sum(3)
  affinity = jnp.einsum("bihd,bjhd->bij", q_regions, k_regions)
  return jax.lax.top_k(jax.lax.stop_gradient(affinity), topk)[1].astype(jnp.int32)


def biformer_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  region_size: int | tuple[int, ...] = 4,
  topk: int = 4,
  scale: float | None = None,
  impl: str = "auto",
) -> jax.Array:
  """BiFormer bi-level routing attention (Zhu et al. 2023, arXiv 2303.08125).

  Every region (non-overlapping block of `region_size` positions per axis) routes to the
  `topk` regions of highest affinity (`route_regions`); its queries then attend to all tokens
  of those regions. The local context enhancement (a depthwise conv on v) is left to models.

  Args:
    q: `[batch, *spatial, heads, head_dim]`, each spatial size divisible by region_size.
    k, v: `[batch, *spatial, kv_heads, head_dim | value_dim]`.
    topk: routed regions per region, 1 <= topk <= number of regions.

  Returns:
    `[batch, *spatial, heads, value_dim]`.
  """
  spatial = api.check_spatial_qkv(q, k, v)
  sizes = api.per_axis("region_size", region_size, len(spatial), int)
  for axis, (length, size) in enumerate(zip(spatial, sizes, strict=True)):
    window.Blocked(size).check(length, axis)
  num_regions = math.prod(n // s for n, s in zip(spatial, sizes, strict=True))
  if not isinstance(topk, int) or not 1 <= topk <= num_regions:
    raise ValueError(f"topk must be an int in [1, num_regions={num_regions}], got topk={topk!r}")
  scale = resolve_scale(scale, q.shape[-1])
  return registry.dispatch(BIFORMER_IMPLS, impl, q, k, v, region_size=sizes, topk=topk, scale=scale)


@functools.partial(jax.jit, static_argnames=("region_size", "topk", "scale"))
def _biformer_reference(q, k, v, *, region_size, topk, scale):
  """Dense attention under the routed mask `region(key) in routed(region(query))`, float32."""
  spatial = q.shape[1:-2]
  region_grid = tuple(n // s for n, s in zip(spatial, region_size, strict=True))
  region_coords = [np.arange(n) // s for n, s in zip(spatial, region_size, strict=True)]
  region_of = np.ravel_multi_index(np.meshgrid(*region_coords, indexing="ij"), region_grid)
  region_of = region_of.reshape(-1)  # region id of every row-major position
  routed = route_regions(q, k, region_size=region_size, topk=topk)
  region_seen = jax.nn.one_hot(routed, math.prod(region_grid), dtype=jnp.int32).sum(-2) > 0
  allowed = region_seen[:, region_of][:, :, region_of]  # [batch, N, N]
  flat = [x.astype(jnp.float32).reshape(x.shape[0], -1, *x.shape[-2:]) for x in (q, k, v)]
  out = jax.nn.dot_product_attention(*flat, mask=allowed[:, None], scale=scale)
  return out.reshape(*q.shape[:-1], v.shape[-1]).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("region_size", "topk", "scale"))
def _biformer_gather(q, k, v, *, region_size, topk, scale):
  """Each query region attends to the gathered tokens of its `topk` routed regions."""
  plan = _region_plan(q.shape[1:-2], region_size)
  routed = route_regions(q, k, region_size=region_size, topk=topk)
  q_regions, k_regions, v_regions = (window.to_tiles(x, plan) for x in (q, k, v))
  batch, regions, tokens, kv_heads, _ = k_regions.shape
  pick = jax.vmap(lambda x, ids: x[ids])  # per batch: [regions, topk, tokens, hk, d]
  k_sel = pick(k_regions, routed).reshape(batch, regions, topk * tokens, kv_heads, -1)
  v_sel = pick(v_regions, routed).reshape(batch, regions, topk * tokens, kv_heads, -1)
  q_groups = q_regions.reshape(batch, regions, tokens, kv_heads, -1, q.shape[-1])
  logits = jnp.einsum("bntkgd,bnskd->bnkgts", q_groups, k_sel, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits * scale, axis=-1)
  out = jnp.einsum(
    "bnkgts,bnskd->bntkgd", probs.astype(v.dtype), v_sel, preferred_element_type=jnp.float32
  )
  out = out.reshape(batch, regions, tokens, q.shape[-2], v.shape[-1]).astype(q.dtype)
  return window.from_tiles(out, plan)


def _region_plan(spatial, region_size) -> window.TilePlan:
  """A plan whose tiles are exactly the regions (only its layout is used)."""
  sizes = tuple(region_size) if isinstance(region_size, tuple) else (region_size,) * len(spatial)
  return window.tile_plan(tuple(spatial), tuple(window.Blocked(s) for s in sizes), sizes)


BIFORMER_IMPLS = {"reference": _biformer_reference, "xla": _biformer_gather}

api.register_local(
  "biformer",
  biformer_attention,
  "Zhu et al. 2023, BiFormer: Bi-Level Routing Attention (arXiv 2303.08125)",
  "region top-k routing, then attention over the routed regions",
  impls=tuple(BIFORMER_IMPLS),
  example=functools.partial(
    api.spatial_example, spatial=(8, 8), options={"region_size": 2, "topk": 3}
  ),
)
