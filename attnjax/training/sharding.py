"""Device mesh from the config, and logical axis names -> mesh shardings via a rules table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None


def mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves one `-1` entry of `shape` so the product is `num_devices`; validates it."""
  shape = dict(shape)
  fill = [axis for axis, size in shape.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"mesh.shape may have one -1 entry, got {shape}")
  known = math.prod(size for size in shape.values() if size != -1)
  if fill:
    if num_devices % known:
      raise ValueError(
        f"mesh.shape {shape}: the fixed axes ({known} devices) do not divide the "
        f"{num_devices} available devices"
      )
    shape[fill[0]] = num_devices // known
  if math.prod(shape.values()) != num_devices:
    raise ValueError(
      f"mesh.shape {shape} needs {math.prod(shape.values())} devices, but {num_devices} are "
      "available (set one axis to -1 to fill)"
    )
  return shape


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None):
  """A `jax.sharding.Mesh` over `devices` (default: all), in process order."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(shape, len(devices))
  return jax.sharding.Mesh(np.array(devices).reshape(tuple(sizes.values())), tuple(sizes))


def mesh_spec(logical: PartitionSpec | Sequence, rules: Sequence[tuple[str, MeshAxes]]):
  """`PartitionSpec` of logical names (e.g. `("embed", "mlp")`) -> one of mesh axes."""
  table = dict(rules)
  out = []
  for name in logical:
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no entry in mesh.rules {sorted(table)}")
    axes = None if name is None else table[name]
    out.append(tuple(axes) if isinstance(axes, list | tuple) else axes)
  return PartitionSpec(*out)


def tree_shardings(logical_specs, rules, mesh):
  """Maps a tree of logical `PartitionSpec`s to `NamedSharding`s on `mesh`."""
  return jax.tree.map(
    lambda spec: NamedSharding(mesh, mesh_spec(spec, rules)),
    logical_specs,
    is_leaf=lambda x: isinstance(x, PartitionSpec),
  )


def check_divisible(abstract_tree, shardings) -> None:
  """Raises `ValueError` naming the first array whose dims do not split evenly on its mesh."""

  def check(path, x, sharding):
    for dim, (size, axes) in enumerate(zip(x.shape, sharding.spec, strict=False)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      parts = math.prod(sharding.mesh.shape[a] for a in axes)
      if size % parts:
        raise ValueError(
          f"{jax.tree_util.keystr(path)} of shape {x.shape}: dim {dim} ({size}) is not divisible "
          f"by mesh axes {axes} ({parts} devices) under spec {sharding.spec}"
        )

  jax.tree_util.tree_map_with_path(check, abstract_tree, shardings)


def batch_sharding(mesh, rules, ndim: int) -> NamedSharding:
  """Sharding of a `[batch, seq, ...]` data array: logical axes `batch`, `seq`, rest replicated."""
  logical = ("batch", "seq", *([None] * (ndim - 2)))[:ndim]
  return NamedSharding(mesh, mesh_spec(logical, rules))


def abstract_mesh(shape: Mapping[str, int]) -> jax.sharding.AbstractMesh:
  """A device-free mesh of `shape` (no -1), to check shardings of a pod run on a laptop."""
  if any(size < 1 for size in shape.values()):
    raise ValueError(f"an abstract mesh needs explicit axis sizes, got {dict(shape)}")
  return jax.sharding.AbstractMesh(tuple(shape.values()), tuple(shape))


def bytes_per_device(abstract_tree) -> int:
  """Bytes one device holds of a tree of `ShapeDtypeStruct`s carrying `NamedSharding`s."""
  return sum(
    math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(abstract_tree)
  )
