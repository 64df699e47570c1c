"""`per_shard`: an attention op run on each device's local batch under `jax.shard_map`.

XLA cannot partition a Pallas kernel (a Mosaic `tpu_custom_call` on global arrays of a
GSPMD-partitioned program fails to compile), so a model on a data-parallel mesh runs its
attention op per shard: every device calls the op on its slice of the batch, which is the
same function, since attention never mixes examples of a batch.

    attn = per_shard(attnjax.ops.dot_product_attention, mesh, ("data", "fsdp"))
    out = attn(q, k, v, mask=masks.causal())          # q, k, v: global [b, T, h, d] arrays
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection, Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec

from attnjax import registry
from attnjax.parallel import mesh as mesh_lib


def _is_array(x) -> bool:
  return isinstance(x, jax.Array | np.ndarray)


@functools.cache
def _replicated(name: str) -> frozenset[int | str]:
  """Positions and names of variant `name`'s array arguments that do not follow the batch.

  Read from its `example_inputs` at two batch sizes, so a parameter whose leading dim happens
  to equal the batch (e.g. relative position embeddings) is never split.
  """
  variant = registry.get(name)
  (args2, kwargs2), (args3, kwargs3) = (
    variant.example_inputs(jax.random.key(0), batch=batch) for batch in (2, 3)
  )
  two = {**dict(enumerate(args2)), **kwargs2}
  three = {**dict(enumerate(args3)), **kwargs3}
  return frozenset(
    key for key, x in two.items() if _is_array(x) and (x.ndim == 0 or x.shape == three[key].shape)
  )


def _batch_parts(mesh, batch_axes: tuple[str, ...]) -> int:
  """Devices the batch is split over; a `ValueError` lists the mesh axes for an unknown one."""
  return math.prod(mesh_lib.axis_size(mesh, axis) for axis in batch_axes)


def _check_batch(batch: int, parts: int, batch_axes: tuple[str, ...], mesh) -> None:
  if batch % parts:
    raise ValueError(
      f"per_shard splits the batch over mesh axes {batch_axes} ({parts} devices of mesh "
      f"{dict(mesh.shape)}); got batch={batch}, which {parts} does not divide: make the batch "
      f"size a multiple of {parts}"
    )


def _check_outputs(outputs, local_batch: int):
  """`outputs` of one shard, each leaf `[local_batch, ...]`; a `ValueError` otherwise."""
  for leaf in jax.tree.leaves(outputs):
    if leaf.ndim == 0 or leaf.shape[0] != local_batch:
      raise ValueError(
        f"per_shard needs every output of the op to lead with the batch dim (local batch "
        f"{local_batch}), got an output of shape {leaf.shape}; an output without a batch dim "
        f"(e.g. a scalar loss) has no defined per-shard meaning: return it per example"
      )
  return outputs


def per_shard(
  op: Callable,
  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
  batch_axes: str | Sequence[str] | None,
  *,
  replicated: Collection[int | str] | None = None,
) -> Callable:
  """`op` with its batch dimension split over `batch_axes` of `mesh`, run per shard.

  The returned function has `op`'s signature on global arrays. `q` (the first argument) is
  `[batch, ...]`; every other array argument (positional or keyword) whose leading dim is
  `batch` is split the same way, every other array (e.g. `sinks [heads]`) is replicated, and
  non-array arguments (masks, sizes, `impl=`) are static. Every output (an array or a pytree
  of arrays, e.g. `(out [batch, seq, heads, dim], lse [batch, seq, heads])`) leads with the
  batch dim and comes back split over `batch_axes`; an output without one is a `ValueError`.

  Mesh axes not in `batch_axes` (e.g. "tensor", "fsdp" for parameters) are replicated for
  the op: arrays sharded over them (e.g. heads over "tensor") are gathered at its input.
  An array whose leading dim only happens to equal the batch size must be named in
  `replicated`; for a registered variant that list is read from its `example_inputs`.

  Args:
    op: an attention op `(q, k, v, *arrays, **keywords) -> outputs`.
    mesh: a `jax.sharding.Mesh` or `AbstractMesh` (Auto axis types).
    batch_axes: the mesh axes the batch is split over (e.g. `("data", "fsdp")`); None: none.
    replicated: positions and names of array arguments never split (None: for a
      `registry.Variant`, those whose shape does not follow the batch in its examples).

  Returns:
    `op` on global arrays; a `ValueError` when `batch` does not divide into the batch axes.
  """
  axes = (
    ()
    if batch_axes is None
    else (batch_axes,)
    if isinstance(batch_axes, str)
    else tuple(batch_axes)
  )
  parts = _batch_parts(mesh, axes)
  if replicated is None:
    replicated = _replicated(op.name) if isinstance(op, registry.Variant) else ()

  @functools.wraps(op)
  def call(*args, **kwargs):
    batch = args[0].shape[0]
    _check_batch(batch, parts, axes, mesh)
    pos = {i: x for i, x in enumerate(args) if _is_array(x)}
    kw = {key: x for key, x in kwargs.items() if _is_array(x)}

    def spec(key, x) -> PartitionSpec:
      split = key not in replicated and x.ndim > 0 and x.shape[0] == batch
      return mesh_lib.batch_spec(x.ndim, axes or None) if split else PartitionSpec()

    def local(pos_shards: dict, kw_shards: dict):
      positional = [pos_shards.get(i, x) for i, x in enumerate(args)]
      outputs = op(*positional, **{**kwargs, **kw_shards})
      return _check_outputs(outputs, batch // parts)

    return jax.shard_map(
      local,
      mesh=mesh,
      in_specs=({i: spec(i, x) for i, x in pos.items()}, {n: spec(n, x) for n, x in kw.items()}),
      out_specs=PartitionSpec(axes or None),
      check_vma=False,
    )(pos, kw)

  return call
