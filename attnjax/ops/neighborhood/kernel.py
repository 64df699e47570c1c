"""The "pallas" / "pallas_interpret" implementations: a `window.TilePlan` run by the fused kernel.

Lays q, k, v out tile-major as `[batch, heads, N, dim]` and calls
`kernels_pallas.neighborhood.tile_sparse_attention` with the plan's tile lists. The kernel is
written for TPU (Mosaic); elsewhere "pallas" raises `registry.Unsupported` (so `impl="auto"`
falls back to "xla") and "pallas_interpret" runs it in the Pallas interpreter.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.pallas import tpu as pltpu

from attnjax import registry
from attnjax.ops.neighborhood import window
from attnjax.ops.neighborhood.blockwise import BlockSizes
from kernels_pallas.neighborhood import TileSchedule, tile_sparse_attention

# Tiles of 128 rows fill the MXU; the last tile axis stays a multiple of 8 (sublanes).
_PALLAS_TILES = {1: (128,), 2: (8, 16), 3: (4, 4, 8)}


def attention(q, k, v, *, windows, scale, block_sizes: BlockSizes | None = None):
  """Same signature and result as `reference.attention`, via the TPU kernel."""
  if jax.default_backend() != "tpu":
    raise registry.Unsupported(
      f"the neighborhood Pallas kernel targets TPU, not {jax.default_backend()!r}; use "
      f"impl='xla' (or impl='pallas_interpret' to run the kernel in the interpreter)"
    )
  return fused_attention(q, k, v, windows=windows, scale=scale, block_sizes=block_sizes)


def attention_interpret(q, k, v, *, windows, scale, block_sizes: BlockSizes | None = None):
  """`attention` run by the Pallas interpreter (any backend)."""
  return fused_attention(
    q, k, v, windows=windows, scale=scale, block_sizes=block_sizes, interpret=True
  )


# Jitted so that eager calls compile once; the geometry is static.
@functools.partial(jax.jit, static_argnames=("windows", "scale", "block_sizes", "interpret"))
def fused_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  windows: tuple[window.AxisWindow, ...],
  scale: float,
  block_sizes: BlockSizes | None = None,
  interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
  """The kernel on `[batch, *spatial, heads, dim]` inputs, on any backend (no device check).

  Arguments as `reference.attention` (already validated), plus the kernel's `interpret`
  switch; `jax.export` uses it to lower the kernel for TPU from a CPU host.
  """
  spatial = q.shape[1:-2]
  blocks = block_sizes or BlockSizes(_PALLAS_TILES[len(spatial)])
  # Rows per tile stay a multiple of 8 (TPU sublanes) whatever the spatial sizes.
  plan = window.tile_plan(spatial, windows, blocks.fit(spatial, last_multiple=8))
  q_rows, k_rows, v_rows = (_heads_major(window.to_tiles(x, plan)) for x in (q, k, v))
  out = tile_sparse_attention(
    q_rows, k_rows, v_rows, tile_schedule(plan), scale=scale, interpret=interpret
  )
  out = out.transpose(0, 2, 1, 3).reshape(
    q.shape[0], plan.num_tiles, plan.tile_size, -1, v.shape[-1]
  )
  return window.from_tiles(out, plan)


def _heads_major(x_tiles: jax.Array) -> jax.Array:
  """`[batch, tiles, T, heads, dim]` -> `[batch, heads, tiles * T, dim]`."""
  b, n, t, h, d = x_tiles.shape
  return x_tiles.reshape(b, n * t, h, d).transpose(0, 2, 1, 3)


@functools.lru_cache(maxsize=64)
def tile_schedule(plan: window.TilePlan) -> TileSchedule:
  """The kernel's view of a plan (cached per plan)."""
  return TileSchedule(
    plan.kv_tiles,
    plan.kv_counts,
    plan.mask_ids,
    plan.q_tiles,
    plan.q_counts,
    plan.mask_ids_t,
    plan.mask_table,
  )
