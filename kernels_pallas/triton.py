"""What every Triton-backend kernel of kernels_pallas shares: the smallest dot tile and the
`pallas_call` wiring.

Tile matmuls are `common.dot` on the input dtype (tensor cores for bfloat16/float16, float32
accumulation). Float32 operands follow `jax.default_matmul_precision` as XLA's own GPU dots do:
TF32 by default, IEEE float32 under "float32"/"highest" (the Triton lowering maps HIGHEST to
`input_precision="ieee"`).
"""

from __future__ import annotations

import functools

from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from kernels_pallas import common

MIN_DOT = 16  # tl.dot's smallest M, N and K on hardware
# The widest (power-of-two padded) head dim whose tiles the kernels' launch settings fit in the
# shared memory of the smallest GPU compiled for: A100 (sm_80), 166,912 bytes per block.
# `benchmarks/gpu_compile.py` compiles every kernel up to it on A100 and H200.
MAX_HEAD_DIM = 256
A100_SHARED_MEMORY = 166_912
# Rows of a [tile, head_dim] operand wider than this (head dim 256 in float32) take half-height
# tiles, so the pipelined K/V (or Q/dO) tiles stay within the A100's shared memory.
WIDE_ROW_BYTES = 512


def check_head_dims(*, interpret: bool, **dims: int) -> None:
  """Raises `Unsupported` (a ValueError) naming a head dim whose padded tiles exceed
  `MAX_HEAD_DIM` on hardware; the interpreter has no shared-memory limit."""
  for name, dim in dims.items():
    padded = common.next_power_of_two(dim)
    if not interpret and padded > MAX_HEAD_DIM:
      raise common.Unsupported(
        f"{name}={dim} (padded to {padded}) is over {MAX_HEAD_DIM}, the widest head dim whose "
        f"Triton tiles fit the {A100_SHARED_MEMORY} bytes of shared memory per block of an A100"
      )


def whole(shape) -> pl.BlockSpec:
  """A block that is the whole array of `shape`, read by every program."""
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def triton_call(st, kernel, grid, in_specs, out_specs, out_shape, name):
  """`pl.pallas_call` of `kernel(..., st=st)` with Triton compiler params from `st`.

  `st` is the kernel's static settings: it carries `num_warps`, `num_stages` and `interpret`.
  """
  return pl.pallas_call(
    functools.partial(kernel, st=st),
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=pl_triton.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages),
    interpret=st.interpret,
    name=name,
  )
