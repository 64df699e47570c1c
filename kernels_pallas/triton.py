"""What every Triton-backend kernel of kernels_pallas shares: the smallest dot tile and the
`pallas_call` wiring."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from kernels_pallas import common

MIN_DOT = 16  # tl.dot's smallest M, N and K on hardware


def dot(a, b, *, dtype, **transposes):
  """Matmul of 2-D tiles on `dtype` operands with float32 accumulation: IEEE float32 for
  float32 (Triton's default would be TF32), tensor cores for bfloat16."""
  precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return common.dot(a, b, dtype=dtype, precision=precision, **transposes)


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
