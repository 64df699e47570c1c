"""Parameters with logical axis names, the vocabulary of sharding rules.

Logical names (`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`) are stored as
`out_sharding` metadata on each `nnx.Param`; a rules table in the config maps them to mesh
axes (`attnjax.training.sharding`). Eager sharding is off: modules can be built without a
mesh, and the trainer places parameters once it has one.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

LOGICAL_AXES = ("batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab")


def param(
  rngs: nnx.Rngs,
  init: Callable[..., jax.Array],
  shape: tuple[int, ...],
  axes: tuple[str | None, ...],
  dtype=jnp.float32,
) -> nnx.Param:
  """`nnx.Param(init(key, shape, dtype))` annotated with one logical axis name per dim."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} must name every dimension of shape {shape}")
  unknown = [a for a in axes if a is not None and a not in LOGICAL_AXES]
  if unknown:
    raise ValueError(f"unknown logical axis names {unknown}; known: {LOGICAL_AXES}")
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


def fan_in_init(fan_in_dims: int = 1) -> Callable[..., jax.Array]:
  """Normal init with variance 1 / fan_in, fan_in = product of the first `fan_in_dims` dims."""
  return nnx.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=tuple(range(fan_in_dims)), out_axis=-1
  )
