"""kernels_pallas.common: power-of-two tiles, which kernels compile here, the shared custom_vjp."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from kernels_pallas import common
from tests.helpers import assert_close, random_normal


def test_powers_of_two():
  assert [n for n in range(-2, 17) if common.is_power_of_two(n)] == [1, 2, 4, 8, 16]
  assert not common.is_power_of_two(True) and not common.is_power_of_two(4.0)
  assert [common.next_power_of_two(n) for n in (1, 2, 3, 5, 60, 64, 65)] == [
    1,
    2,
    4,
    8,
    64,
    64,
    128,
  ]
  assert common.next_power_of_two(5, at_least=16) == 16
  assert common.next_power_of_two(37, at_least=16) == 64


@pytest.mark.parametrize(
  "backend, tpu_compiler, gpu_compiler, kernels",
  [
    ("cpu", False, False, ()),
    ("cpu", True, False, ("tpu",)),
    ("cpu", True, True, ("tpu", "gpu")),
    ("cpu", False, True, ("gpu",)),
    ("tpu", False, False, ("tpu",)),
    ("cuda", False, False, ("gpu",)),
    ("rocm", False, False, ("gpu",)),
  ],
)
def test_compilable_kernels_follow_backend_and_compile_only_devices(
  monkeypatch, backend, tpu_compiler, gpu_compiler, kernels
):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  monkeypatch.setattr(common, "_tpu_compiler_initialized", lambda: tpu_compiler)
  monkeypatch.setattr(common, "_gpu_compiler_initialized", lambda: gpu_compiler)
  assert common.compilable_kernels() == kernels


def test_check_kernel_rejects_unknown_names():
  assert common.check_kernel("gpu") == "gpu"
  with pytest.raises(ValueError, match=r"kernel must be one of \('tpu', 'gpu'\)"):
    common.check_kernel("cuda")


@dataclasses.dataclass(frozen=True)
class _Power:
  exponent: int


def _forward(st, x, y):
  return x**st.exponent * y, (x, y)


def _backward(st, residuals, d_out):
  x, y = residuals
  return st.exponent * x ** (st.exponent - 1) * y * d_out, x**st.exponent * d_out


def test_custom_vjp_uses_the_backward_and_keeps_settings_static():
  power = common.custom_vjp(_forward, _backward)
  x, y = (random_normal(jax.random.PRNGKey(i), (3, 5)) for i in range(2))
  st = _Power(3)
  grads = jax.jit(jax.grad(lambda x, y: power(st, x, y).sum(), argnums=(0, 1)))(x, y)
  expected = jax.grad(lambda x, y: (x**3 * y).sum(), argnums=(0, 1))(x, y)
  for g, ref in zip(grads, expected, strict=True):
    assert_close(g, ref, 1e-6, "gradient")
  assert_close(jax.jit(power, static_argnums=0)(st, x, y), x**3 * y, 1e-6, "value")
