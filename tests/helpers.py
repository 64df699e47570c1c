"""Shared test helpers: relative error against the float32 reference, random inputs."""

from __future__ import annotations

import functools

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


def _is_float_array(x) -> bool:
  return isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(x.dtype, jnp.floating)


def float_leaves(tree) -> list[bool]:
  """Which leaves of `tree` are floating-point arrays (the ones gradients are taken of)."""
  return [_is_float_array(leaf) for leaf in jax.tree.leaves(tree)]


def jit_call(fn, args: tuple, kwargs: dict):
  """`fn(*args, **kwargs)` compiled with `jax.jit`: arrays are traced, everything else (masks,
  sizes, names) is closed over as static."""
  leaves, treedef = jax.tree.flatten((args, kwargs))
  is_array = [isinstance(leaf, jax.Array | np.ndarray) for leaf in leaves]

  def call(arrays):
    it = iter(arrays)
    full = [next(it) if a else leaf for leaf, a in zip(leaves, is_array, strict=True)]
    a, kw = jax.tree.unflatten(treedef, full)
    return fn(*a, **kw)

  return jax.jit(call)([leaf for leaf, a in zip(leaves, is_array, strict=True) if a])


def value_and_grads(fn, args: tuple, kwargs: dict, seed: int = 0):
  """`fn(*args, **kwargs)` and the gradients of a random projection of its outputs with
  respect to every floating-point array in `args` and `kwargs` (a list, in leaf order)."""
  leaves, treedef = jax.tree.flatten((args, kwargs))
  is_float = float_leaves((args, kwargs))
  diff = [leaf for leaf, f in zip(leaves, is_float, strict=True) if f]

  def call(diff_leaves):
    it = iter(diff_leaves)
    full = [next(it) if f else leaf for leaf, f in zip(leaves, is_float, strict=True)]
    a, kw = jax.tree.unflatten(treedef, full)
    return fn(*a, **kw)

  out, vjp = jax.vjp(jax.jit(call), diff)
  cotangent = jax.tree.map(
    lambda x: (
      random_normal(jax.random.key(seed), x.shape, x.dtype)
      if jnp.issubdtype(x.dtype, jnp.floating)
      else np.zeros(x.shape, jax.dtypes.float0)
    ),
    out,
  )
  (grads,) = vjp(cotangent)
  return out, grads


def assert_matches_reference(fn, reference, args: tuple, kwargs: dict, tol: float, what: str):
  """`fn` equals `reference` on `(args, kwargs)`: outputs within `tol`, gradients with respect
  to every floating-point input within `2 * tol` (DESIGN.md's relative errors). The reference
  runs on float32 copies of the floating-point inputs (it is the float32 oracle)."""
  out, grads = value_and_grads(fn, args, kwargs)
  ref_args, ref_kwargs = jax.tree.map(
    lambda x: x.astype(jnp.float32) if _is_float_array(x) else x, (args, kwargs)
  )
  ref_out, ref_grads = value_and_grads(reference, ref_args, ref_kwargs)
  for i, (x, ref) in enumerate(zip(jax.tree.leaves(out), jax.tree.leaves(ref_out), strict=True)):
    assert x.shape == ref.shape, f"{what}: output {i} has shape {x.shape}, reference {ref.shape}"
    assert_close(x, ref, tol, f"{what}: output {i}")
  for i, (g, ref) in enumerate(zip(grads, ref_grads, strict=True)):
    assert_close(g, ref, 2 * tol, f"{what}: gradient of float input {i}")


@functools.cache
def seq_mesh(parts: int = 4) -> jax.sharding.Mesh:
  """A 1-D mesh with axis "seq" over the first `parts` (simulated) devices, Auto axis types."""
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((parts,), ("seq",), axis_types=(auto,), devices=jax.devices()[:parts])


def kernel_on_cpu(monkeypatch, kernel: str) -> None:
  """Makes `kernel` ("tpu" or "gpu") the one `registry.dispatch` lowers for the CPU platform,
  so a test on this host checks which kernel impl="pallas"/"auto" run there."""
  from kernels_pallas import common

  monkeypatch.setattr(common, "compilable_kernels", lambda: (kernel,))
  monkeypatch.setitem(common.PLATFORMS, kernel, ("cpu",))
