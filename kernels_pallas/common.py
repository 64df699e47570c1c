"""What every kernel family of kernels_pallas shares: power-of-two tiles, which platforms each
kernel compiles for, and the `custom_vjp` that joins a forward and a backward pass."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxlib import xla_client

# The platforms each kernel lowers for, as `jax.lax.platform_dependent` names them.
PLATFORMS = {"tpu": ("tpu",), "gpu": ("cuda", "rocm")}
KERNELS = tuple(PLATFORMS)


class Unsupported(ValueError):  # noqa: N818 - reads better at raise sites: `raise Unsupported(...)`
  """An implementation cannot handle this call (`attnjax.registry.Unsupported`): `impl="auto"`
  tries the next one, an explicit `impl` gets this ValueError."""


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
  initialized, as `jax.experimental.topologies.get_topology_desc` does) and "gpu" once it has
  made compile-only GPU devices (`attnjax.aot.gpu_devices`). A CPU process that never asks for
  such devices traces no TPU or GPU kernel, even with libtpu or the CUDA plugin installed."""
  backend = jax.default_backend()
  kernels = {"tpu"} if backend == "tpu" or _tpu_compiler_initialized() else set()
  if backend in ("gpu", "cuda", "rocm") or _gpu_compiler_initialized():
    kernels.add("gpu")
  return tuple(k for k in KERNELS if k in kernels)


def _tpu_compiler_initialized() -> bool:
  return xla_client.pjrt_plugin_loaded("tpu") and xla_client.pjrt_plugin_initialized("tpu")


# The CUDA plugin loads with every backend initialization, used or not, so it cannot tell
# whether compile-only GPU devices exist: `attnjax.aot.gpu_devices` says so here.
_compile_only_gpu_devices = False


def compile_only_gpu_devices_made() -> None:
  """Called when compile-only GPU devices exist: from then on programs lower the GPU kernels."""
  global _compile_only_gpu_devices
  _compile_only_gpu_devices = True


def _gpu_compiler_initialized() -> bool:
  return _compile_only_gpu_devices


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
