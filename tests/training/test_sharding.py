"""Mesh shapes and logical-axis rules: resolution and clear errors."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from attnjax.training import sharding
from attnjax.training.config import DEFAULT_RULES


def test_mesh_shape_fills_one_axis():
  shape = sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1, "seq": 1}, 8)
  assert shape == {"data": 4, "fsdp": 2, "tensor": 1, "seq": 1}
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1, "seq": 1})
  assert dict(mesh.shape) == shape and list(mesh.devices.flat) == jax.devices()


@pytest.mark.parametrize(
  "shape,match",
  [
    ({"data": -1, "fsdp": 3}, "do not divide the 8 available devices"),
    ({"data": -1, "fsdp": -1}, "one -1 entry"),
    ({"data": 2, "fsdp": 2}, "needs 4 devices, but 8 are available"),
  ],
)
def test_bad_mesh_shapes_are_clear_errors(shape, match):
  with pytest.raises(ValueError, match=match):
    sharding.mesh_shape(shape, 8)


def test_logical_specs_map_through_the_rules():
  assert sharding.mesh_spec(("embed", "mlp"), DEFAULT_RULES) == P("fsdp", "tensor")
  assert sharding.mesh_spec(("batch", None), DEFAULT_RULES) == P(("data", "fsdp"), None)
  with pytest.raises(ValueError, match="'experts' has no entry in mesh.rules"):
    sharding.mesh_spec(("experts",), DEFAULT_RULES)


def test_indivisible_parameter_is_named():
  mesh = sharding.abstract_mesh({"data": 1, "fsdp": 4, "tensor": 1, "seq": 1})
  tree = {"w": jax.ShapeDtypeStruct((6, 8), "float32")}
  shardings = sharding.tree_shardings({"w": P("embed", "mlp")}, DEFAULT_RULES, mesh)
  with pytest.raises(ValueError, match=r"\['w'\] of shape \(6, 8\): dim 0 \(6\) is not divisible"):
    sharding.check_divisible(tree, shardings)
