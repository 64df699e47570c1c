"""Shared test helpers: relative error against the float32 reference, random inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# DESIGN.md tolerances on ||out - ref|| / ||ref||; gradients get twice these.
TOL_EXACT_F32 = 1e-5
TOL_BLOCKED_F32 = 1e-4
TOL_BF16 = 1e-2


def rel_error(x, ref) -> float:
  """||x - ref|| / ||ref|| in float64 (treats -inf == -inf as equal)."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  both_inf = np.isinf(x) & np.isinf(ref) & (np.sign(x) == np.sign(ref))
  x, ref = np.where(both_inf, 0.0, x), np.where(both_inf, 0.0, ref)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def assert_close(x, ref, tol: float, what: str = "") -> None:
  assert np.all(np.isfinite(np.asarray(x, np.float64)) | np.isinf(np.asarray(ref))), what
  err = rel_error(x, ref)
  assert err < tol, f"{what}: relative error {err:.3g} >= {tol:.1g}"


def random_normal(key, shape, dtype=jnp.float32):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def tolerance(dtype, blocked: bool = True) -> float:
  if dtype == jnp.bfloat16:
    return TOL_BF16
  return TOL_BLOCKED_F32 if blocked else TOL_EXACT_F32
