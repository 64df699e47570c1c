"""Every variant that declares a sequence-parallel split runs under each strategy of its split
on 4 simulated devices and equals the single-device reference, on values and gradients."""

import jax
import pytest

from attnjax import registry
from attnjax.parallel import sequence_parallel
from tests.helpers import TOL_BLOCKED_F32, assert_matches_reference, seq_mesh

STRATEGIES = {
  "mask": ("ring", "allgather", "ulysses"),
  "state": ("lasp2", "zeco"),
  "heads": ("ulysses",),
  "delta": ("lasp2",),
}
CASES = [
  (name, strategy)
  for name in registry.names()
  if registry.get(name).capabilities.split is not None
  for strategy in STRATEGIES[registry.get(name).capabilities.split]
]


@pytest.mark.parametrize("name,strategy", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_declared_split_equals_one_device(name, strategy):
  variant = registry.get(name)
  # 32 tokens: 2 zigzag chunks per device; 4 query heads: one per device under Ulysses.
  args, kwargs = variant.example_inputs(jax.random.key(5), seq=32, heads=4, kv_heads=2)
  sharded = sequence_parallel(name, seq_mesh(), strategy=strategy)
  assert_matches_reference(
    lambda *a, **kw: sharded(*a, impl="xla", **kw),
    variant.reference,
    args,
    kwargs,
    TOL_BLOCKED_F32,
    f"{name} {strategy}",
  )


@pytest.mark.parametrize(
  "name", [n for n in registry.names() if registry.get(n).capabilities.split is None]
)
def test_a_variant_without_a_split_is_refused_by_name(name):
  with pytest.raises(ValueError, match=f"got {name!r}"):
    sequence_parallel(name, seq_mesh(), strategy="ulysses")
