"""Tiled local attention in pure JAX: each query tile visits only the key tiles it can reach.

Executes a `window.TilePlan`: queries and keys are laid out tile-major, each query tile gathers
its `max_steps` key tiles (a constant number, so the cost is O(N x reach), not O(N^2)) and
attends to them under the plan's boolean tiles. The backward pass is a `custom_vjp` that keeps
only `out` and the log-sum-exp and recomputes the probabilities (FlashAttention style), so the
memory of forward and backward is linear in N. Must equal `reference.attention`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from attnjax.ops.neighborhood import window

# Default tile shapes by number of spatial axes: small tiles waste little work on masked keys.
_XLA_TILES = {1: (64,), 2: (8, 8), 3: (4, 4, 4)}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile shape, one size per spatial axis (sizes above an axis's length are clipped)."""

  tile: tuple[int, ...]

  def __post_init__(self):
    if not self.tile or any(not isinstance(t, int) or t < 1 for t in self.tile):
      raise ValueError(f"BlockSizes.tile must be positive ints, got tile={self.tile!r}")

  def fit(self, spatial: tuple[int, ...], last_multiple: int = 1) -> tuple[int, ...]:
    """Tiles clipped to the axes; the last axis's stays a multiple of `last_multiple`."""
    if len(self.tile) != len(spatial):
      raise ValueError(
        f"BlockSizes.tile needs one size per spatial axis {spatial}, got tile={self.tile}"
      )
    tile = [min(t, n) for t, n in zip(self.tile, spatial, strict=True)]
    if self.tile[-1] % last_multiple == 0:
      tile[-1] = min(self.tile[-1], -(-spatial[-1] // last_multiple) * last_multiple)
    return tuple(tile)


# Jitted so that eager calls compile once; the geometry is static.
@functools.partial(jax.jit, static_argnames=("windows", "scale", "block_sizes"))
def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  windows: tuple[window.AxisWindow, ...],
  scale: float,
  block_sizes: BlockSizes | None = None,
) -> jax.Array:
  """Same signature and result as `reference.attention`, tiled (see the module docstring)."""
  spatial = q.shape[1:-2]
  blocks = block_sizes or BlockSizes(_XLA_TILES[len(spatial)])
  plan = window.tile_plan(spatial, windows, blocks.fit(spatial))
  q_tiles, k_tiles, v_tiles = (window.to_tiles(x, plan) for x in (q, k, v))
  out = _tiled_attention(q_tiles, k_tiles, v_tiles, plan, scale)
  return window.from_tiles(out, plan)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tiled_attention(q_tiles, k_tiles, v_tiles, plan, scale):
  """`q_tiles [b, tiles, T, h, d]`, `k_tiles`/`v_tiles [b, tiles, T, hk, d]` -> like q."""
  return _forward(q_tiles, k_tiles, v_tiles, plan, scale)[0]


def _forward(q_tiles, k_tiles, v_tiles, plan, scale):
  q_groups = _split_groups(q_tiles, k_tiles.shape[3])
  logits, allowed = _logits(q_groups, k_tiles, plan, scale)
  row_max = logits.max((-2, -1))
  shift = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  probs = jnp.where(allowed, jnp.exp(logits - shift[..., None, None]), 0.0)
  denom = probs.sum((-2, -1))
  safe_denom = jnp.where(denom > 0, denom, 1.0)
  probs = probs / safe_denom[..., None, None]
  out = jnp.einsum(
    "bnkgtsu,bnsukd->bntkgd",
    probs.astype(v_tiles.dtype),
    v_tiles[:, plan.kv_tiles],
    preferred_element_type=jnp.float32,
  )
  lse = jnp.where(denom > 0, jnp.log(safe_denom) + shift, -jnp.inf)
  out = out.reshape(*q_tiles.shape[:-1], v_tiles.shape[-1]).astype(q_tiles.dtype)
  return out, lse


def _split_groups(x, kv_heads):
  """`[b, n, T, h, d]` -> `[b, n, T, kv_heads, h // kv_heads, d]` (GQA by shape)."""
  return x.reshape(*x.shape[:3], kv_heads, x.shape[3] // kv_heads, x.shape[4])


def _logits(q_groups, k_tiles, plan, scale):
  """float32 logits `[b, tiles, hk, g, T, steps, T]` (-inf where masked) and the mask."""
  logits = jnp.einsum(
    "bntkgd,bnsukd->bnkgtsu",
    q_groups,
    k_tiles[:, plan.kv_tiles],
    preferred_element_type=jnp.float32,
  )
  # The barrier keeps XLA from constant-folding the gathered [tiles, steps, Tq, Tk] mask (slow
  # to compile, and a large constant); the small table is gathered at run time instead.
  table = jax.lax.optimization_barrier(jnp.asarray(plan.mask_table))
  allowed = table[jnp.asarray(plan.mask_ids)].transpose(0, 2, 1, 3)  # [tiles, Tq, steps, Tk]
  allowed = allowed[None, :, None, None]
  return jnp.where(allowed, logits * scale, -jnp.inf), allowed


def _tiled_attention_fwd(q_tiles, k_tiles, v_tiles, plan, scale):
  out, lse = _forward(q_tiles, k_tiles, v_tiles, plan, scale)
  return out, (q_tiles, k_tiles, v_tiles, out, lse)


def _tiled_attention_bwd(plan, scale, residuals, d_out):
  q_tiles, k_tiles, v_tiles, out, lse = residuals
  kv_heads = k_tiles.shape[3]
  q_groups = _split_groups(q_tiles, kv_heads)
  logits, allowed = _logits(q_groups, k_tiles, plan, scale)
  safe_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  probs = jnp.where(allowed, jnp.exp(logits - safe_lse[..., None, None]), 0.0)
  d_out_groups = _split_groups(d_out, kv_heads)
  # delta = rowsum(dO * O) = sum_j P_ij dP_ij, the softmax backward's correction term.
  delta = jnp.einsum(
    "bntkgd,bntkgd->bnkgt",
    d_out_groups.astype(jnp.float32),
    _split_groups(out, kv_heads).astype(jnp.float32),
  )
  v_sel = v_tiles[:, plan.kv_tiles]
  d_probs = jnp.einsum(
    "bntkgd,bnsukd->bnkgtsu", d_out_groups, v_sel, preferred_element_type=jnp.float32
  )
  d_logits = probs * (d_probs - delta[..., None, None]) * scale
  d_q = jnp.einsum(
    "bnkgtsu,bnsukd->bntkgd",
    d_logits,
    k_tiles[:, plan.kv_tiles].astype(jnp.float32),
  )
  d_k_sel = jnp.einsum("bnkgtsu,bntkgd->bnsukd", d_logits, q_groups.astype(jnp.float32))
  d_v_sel = jnp.einsum("bnkgtsu,bntkgd->bnsukd", probs, d_out_groups.astype(jnp.float32))
  d_k = jnp.zeros(k_tiles.shape, jnp.float32).at[:, plan.kv_tiles].add(d_k_sel)
  d_v = jnp.zeros(v_tiles.shape, jnp.float32).at[:, plan.kv_tiles].add(d_v_sel)
  return (
    d_q.reshape(q_tiles.shape).astype(q_tiles.dtype),
    d_k.astype(k_tiles.dtype),
    d_v.astype(v_tiles.dtype),
  )


_tiled_attention.defvjp(_tiled_attention_fwd, _tiled_attention_bwd)
