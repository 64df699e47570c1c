"""The "pallas" / "pallas_interpret" implementations: a `window.TilePlan` run by a fused kernel.

Lays q, k, v out tile-major as `[batch, heads, N, dim]` and calls the backend's kernel of
`kernels_pallas.neighborhood` with the plan's tile lists: Mosaic (`tpu.py`) for TPU, Triton
(`gpu.py`) for GPU; `registry.dispatch` picks the one of the platform the program is compiled
for. "pallas_interpret" runs the TPU kernel in the Pallas interpreter, or the GPU kernel with
`kernel="gpu"`.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.pallas import tpu as pltpu

from attnjax.ops.neighborhood import window
from attnjax.ops.neighborhood.blockwise import BlockSizes
from kernels_pallas import common, triton
from kernels_pallas.neighborhood import TileSchedule, gpu, tpu

KERNELS = {"tpu": tpu.tile_sparse_attention, "gpu": gpu.tile_sparse_attention}

# TPU: tiles of 128 rows fill the MXU; the last tile axis stays a multiple of 8 (sublanes).
# GPU: 64-row tiles (Triton needs powers of two) keep a [T, T] f32 tile in registers.
DEFAULT_TILES = {
  "tpu": {1: (128,), 2: (8, 16), 3: (4, 4, 8)},
  "gpu": {1: (64,), 2: (8, 8), 3: (4, 4, 4)},
}
# GPU rows wider than `triton.WIDE_ROW_BYTES` (head_dim 256 in float32): 32-row tiles, since
# at 64 rows the pipelined K/V tiles ask an A100 for 217 KB of its 163 KB of shared memory
# (an H200 for 266 KB of 227 KB).
GPU_WIDE_ROW_TILES = {1: (32,), 2: (4, 8), 3: (2, 4, 4)}


def attention(
  q, k, v, *, windows, scale, block_sizes: BlockSizes | None = None, kernel: str = "tpu"
):
  """Same signature and result as `reference.attention`, via `kernel` ("tpu" or "gpu")."""
  return fused_attention(
    q, k, v, windows=windows, scale=scale, block_sizes=block_sizes, kernel=kernel
  )


def attention_interpret(
  q, k, v, *, windows, scale, block_sizes: BlockSizes | None = None, kernel: str = "tpu"
):
  """`attention` run by the Pallas interpreter (any backend); the TPU kernel by default."""
  return fused_attention(
    q, k, v, windows=windows, scale=scale, block_sizes=block_sizes, interpret=True, kernel=kernel
  )


# Jitted so that eager calls compile once; the geometry is static.
@functools.partial(
  jax.jit, static_argnames=("windows", "scale", "block_sizes", "interpret", "kernel")
)
def fused_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  windows: tuple[window.AxisWindow, ...],
  scale: float,
  block_sizes: BlockSizes | None = None,
  interpret: bool | pltpu.InterpretParams = False,
  kernel: str = "tpu",
) -> jax.Array:
  """A kernel on `[batch, *spatial, heads, dim]` inputs, on any backend (no device check).

  Arguments as `reference.attention` (already validated), plus the kernel's `interpret`
  switch and which `kernel` ("tpu" or "gpu").
  """
  common.check_kernel(kernel)
  spatial = q.shape[1:-2]
  row_bytes = common.next_power_of_two(max(q.shape[-1], v.shape[-1])) * q.dtype.itemsize
  tile = kernel_tile(kernel, spatial, windows, block_sizes, row_bytes=row_bytes)
  plan = window.tile_plan(spatial, windows, tile)
  q_rows, k_rows, v_rows = (_heads_major(window.to_tiles(x, plan)) for x in (q, k, v))
  out = KERNELS[kernel](
    q_rows, k_rows, v_rows, tile_schedule(plan), scale=scale, interpret=interpret
  )
  out = out.transpose(0, 2, 1, 3).reshape(
    q.shape[0], plan.num_tiles, plan.tile_size, -1, v.shape[-1]
  )
  return window.from_tiles(out, plan)


def kernel_tile(
  kernel: str,
  spatial: tuple[int, ...],
  windows: tuple[window.AxisWindow, ...],
  block_sizes: BlockSizes | None = None,
  *,
  row_bytes: int = 0,
) -> tuple[int, ...]:
  """The tile shape `kernel` runs for `block_sizes` (None: its default) on this geometry.

  TPU: rows per tile stay a multiple of 8 (sublanes) whatever the spatial sizes. GPU: every
  edge rounded up to a power of two, at least `kernels_pallas.triton.MIN_DOT` rows, over the
  axes as the plan reorders them (dilation groups padded to whole groups); by default
  half-height tiles where a padded q/k/v row takes more than `triton.WIDE_ROW_BYTES` bytes
  (`row_bytes`).
  """
  default = DEFAULT_TILES[kernel]
  if kernel == "gpu" and row_bytes > triton.WIDE_ROW_BYTES:
    default = GPU_WIDE_ROW_TILES
  blocks = block_sizes or BlockSizes(default[len(spatial)])
  if kernel == "tpu":
    return blocks.fit(spatial, last_multiple=8)
  extents = tuple(
    len(window.group_order(n, w.group_stride)) for n, w in zip(spatial, windows, strict=True)
  )
  return gpu.BlockSizes.covering(blocks.tile).fit(extents)


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
