"""The order of a sequence over the devices of a mesh axis: "natural" or "zigzag".

"natural": the sequence in its own order, device d holding the d-th contiguous shard.
"zigzag" (`mesh.zigzag_order`): the sequence cut into 2P chunks, device d holding chunks d and
2P - 1 - d, which balances causal ring attention over the devices.

Ring attention takes arrays in either layout (`layout=`). On natural-order arrays it moves
q, k, v into the zigzag layout and its outputs back, an exchange of about two shards per
device per call. A model whose every layer runs ring attention lays its tokens out once
instead: `to_zigzag` at its input, `from_zigzag` at its output, rotary positions from
`positions`, and every ring layer called with `layout="zigzag"`.

    ring = sequence_parallel(dot_product_attention, mesh, strategy="ring", layout="zigzag")
    q_z, k_z, v_z = (layout.to_zigzag(x, mesh) for x in (q, k, v))
    out = layout.from_zigzag(ring(q_z, k_z, v_z, mask=masks.causal()), mesh)

Masks and segment ids keep meaning true positions: the ring's plan knows which chunks each
device holds, and segment ids are passed in the arrays' layout. Rotary embeddings applied
before the ring need each row's true position, `positions(T, P, "zigzag")`.
"""

from __future__ import annotations

from typing import Literal

import jax
import numpy as np

from attnjax.parallel import mesh as mesh_lib

Layout = Literal["natural", "zigzag"]
LAYOUTS: tuple[str, ...] = ("natural", "zigzag")


def check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {list(LAYOUTS)}, got layout={layout!r}")


def positions(seq_len: int, parts: int, layout: Layout) -> np.ndarray:
  """int32 `[seq_len]`: the position in the natural sequence of each row of `layout`."""
  check_layout(layout)
  if layout == "natural":
    return np.arange(seq_len, dtype=np.int32)
  mesh_lib.check_split(seq_len, parts, strategy="ring", zigzag=True)
  return mesh_lib.zigzag_order(seq_len, parts).astype(np.int32)


def _relayout(per_device, x, mesh, axis, batch_axes):
  parts = mesh_lib.axis_size(mesh, axis)
  mesh_lib.check_split(x.shape[1], parts, strategy="ring", zigzag=True)
  spec = mesh_lib.seq_spec(x.ndim, axis, batch_axes)
  return jax.shard_map(
    lambda shard: per_device(shard, axis, parts),
    mesh=mesh,
    in_specs=spec,
    out_specs=spec,
    check_vma=False,
  )(x)


def to_zigzag(
  x: jax.Array,
  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
  axis: str = "seq",
  batch_axes: mesh_lib.BatchAxes = None,
) -> jax.Array:
  """Natural-order `x [batch, seq, ...]` -> `x[:, positions(seq, P, "zigzag")]`.

  The result is sharded over `axis` (and its batch over `batch_axes`); each device sends at
  most one shard, in two collective permutes.
  """
  return _relayout(mesh_lib.to_zigzag, x, mesh, axis, batch_axes)


def from_zigzag(
  x: jax.Array,
  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
  axis: str = "seq",
  batch_axes: mesh_lib.BatchAxes = None,
) -> jax.Array:
  """Inverse of `to_zigzag`: zigzag-order `x [batch, seq, ...]` -> natural order."""
  return _relayout(mesh_lib.from_zigzag, x, mesh, axis, batch_axes)
