"""What every kernel family of kernels_pallas shares: power-of-two tiles, which platforms each
kernel compiles for, and the `custom_vjp` that joins a forward and a backward pass."""

from __future__ import annotations

import functools
import importlib.util
import pkgutil
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxlib import xla_client

# The platforms each kernel lowers for, as `jax.lax.platform_dependent` names them.
PLATFORMS = {"tpu": ("tpu",), "gpu": ("cuda", "rocm")}
KERNELS = tuple(PLATFORMS)


def is_power_of_two(n) -> bool:
  """True for an int (not a bool) that is 1, 2, 4, ..."""
  return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def next_power_of_two(n: int, at_least: int = 1) -> int:
  """The smallest power of two >= max(n, at_least)."""
  return max(at_least, 1 << max(0, (n - 1).bit_length()))


def check_kernel(kernel: str) -> str:
  """`kernel` if it names a family member ("tpu": Mosaic, "gpu": Triton); else ValueError."""
  if kernel not in KERNELS:
    raise ValueError(f"kernel must be one of {KERNELS}, got kernel={kernel!r}")
  return kernel


def compilable_kernels() -> tuple[str, ...]:
  """The kernels a program traced now may be compiled with: those of JAX's default backend,
  plus "tpu" once this process has made compile-only TPU devices (libtpu's PJRT plugin is
  initialized, as `jax.experimental.topologies.get_topology_desc` does) and "gpu" where a
  CUDA or ROCm plugin is installed. A CPU process that never asks for TPU devices traces
  no TPU kernel, even with libtpu installed."""
  backend = jax.default_backend()
  kernels = {"tpu"} if backend == "tpu" or _tpu_compiler_initialized() else set()
  if backend in ("gpu", "cuda", "rocm") or _gpu_plugin_installed():
    kernels.add("gpu")
  return tuple(k for k in KERNELS if k in kernels)


def _tpu_compiler_initialized() -> bool:
  return xla_client.pjrt_plugin_loaded("tpu") and xla_client.pjrt_plugin_initialized("tpu")


@functools.cache
def _has_module(name: str) -> bool:
  return importlib.util.find_spec(name) is not None


@functools.cache
def _gpu_plugin_installed() -> bool:
  if not _has_module("jax_plugins"):
    return False
  import jax_plugins

  return any(
    m.name.startswith(("xla_cuda", "xla_rocm")) for m in pkgutil.iter_modules(jax_plugins.__path__)
  )


def dot(a, b, *, dtype, precision=None, transpose_a=False, transpose_b=False):
  """Matmul of 2-D tiles on `dtype` operands with float32 accumulation, optional transposes."""
  contract = (0 if transpose_a else 1, 1 if transpose_b else 0)
  return jax.lax.dot_general(
    a.astype(dtype),
    b.astype(dtype),
    ((contract[:1], contract[1:]), ((), ())),
    precision=precision,
    preferred_element_type=jnp.float32,
  )


def custom_vjp(forward: Callable, backward: Callable) -> Callable:
  """`fn(st, *operands)`: the outputs of `forward`, differentiated by `backward`.

  `forward(st, *operands) -> (outputs, residuals)` and
  `backward(st, residuals, d_outputs) -> (d_operand, ...)`, one cotangent per operand. `st` is
  the call's static settings (a frozen dataclass, hashable), never differentiated.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def fn(st, *operands):
    return forward(st, *operands)[0]

  fn.defvjp(forward, backward)
  return fn
