"""What every kernel family of kernels_pallas shares: power-of-two tiles, which backend's kernel
runs a call, and the `custom_vjp` that joins a forward and a backward pass."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

KERNELS = ("tpu", "gpu")


def is_power_of_two(n) -> bool:
  """True for an int (not a bool) that is 1, 2, 4, ..."""
  return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def next_power_of_two(n: int, at_least: int = 1) -> int:
  """The smallest power of two >= max(n, at_least)."""
  return max(at_least, 1 << max(0, (n - 1).bit_length()))


def select_kernel(kernel: str | None = None, *, interpret: bool = False) -> str | None:
  """Which family member runs a call: "tpu" (Mosaic) or "gpu" (Triton).

  `kernel` when given; else "tpu" when interpreting; else the kernel of `jax.default_backend()`
  ("tpu"; "gpu", "cuda" or "rocm" -> "gpu"), or None when that backend has no kernel.
  Raises ValueError for any other `kernel`.
  """
  if kernel is not None:
    if kernel not in KERNELS:
      raise ValueError(f"kernel must be one of None, 'tpu', 'gpu', got kernel={kernel!r}")
    return kernel
  if interpret:
    return "tpu"
  backend = jax.default_backend()
  if backend == "tpu":
    return "tpu"
  if backend in ("gpu", "cuda", "rocm"):
    return "gpu"
  return None


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
