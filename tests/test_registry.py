"""The registry: lookup, dispatch with fallback, and the README table generated from it."""

import pathlib

import jax
import jax.numpy as jnp
import pytest

import attnjax as aj
from attnjax import registry

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_softmax_presets_are_registered():
  for name in ("softmax", "sliding_window", "chunked", "prefix_lm"):
    variant = registry.get(name)
    assert variant.family == "softmax" and variant.paper
    assert {"reference", "xla"} <= set(variant.impls)


def test_variant_call_applies_its_preset_and_matches_the_op():
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 21, 2, 8)) for i in range(3))
  variant = registry.get("sliding_window")
  out = variant(q, k, v, window=4, impl="xla")
  expected = aj.ops.dot_product_attention(
    q, k, v, mask=aj.masks.sliding_window(3), impl="reference"
  )
  assert jnp.allclose(out, expected, atol=1e-5)
  assert jnp.allclose(variant.reference(q, k, v, window=4), expected, atol=1e-6)


def test_unknown_variant_lists_the_known_ones():
  with pytest.raises(ValueError, match="registered: .*softmax"):
    registry.get("no_such_attention")


def test_auto_dispatch_falls_back_past_unsupported():
  def unsupported(x):
    raise registry.Unsupported("not here")

  impls = {"pallas": unsupported, "xla": lambda x: x + 1, "reference": lambda x: x + 2}
  assert registry.dispatch(impls, "auto", 1) == 2
  with pytest.raises(registry.Unsupported, match="not here"):
    registry.dispatch(impls, "pallas", 1)
  with pytest.raises(ValueError, match="impl must be one of"):
    registry.dispatch(impls, "triton", 1)
  assert registry.auto_order("tpu")[0] == "pallas"
  assert registry.auto_order("cpu")[0] == "xla"


def test_readme_variant_table_is_up_to_date():
  text = README.read_text()
  assert registry.README_START in text and registry.README_END in text
  assert registry.update_readme(text) == text, (
    "README.md's variant table is out of date: run `python -m attnjax variants README.md`"
  )


def test_intercept_sees_each_call_with_the_variants_defaults_and_is_removed_after():
  seen = []

  def hook(variant, op):
    def observed(*args, **kwargs):
      seen.append((variant.name, sorted(kwargs)))
      return op(*args, **kwargs)

    return observed

  q = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
  with registry.intercept(hook):
    inside = registry.get("linear")(q, q, q, impl="reference")
  outside = registry.get("linear")(q, q, q, impl="reference")
  assert seen == [("linear", ["feature_map", "impl", "normalize"])]
  assert jnp.array_equal(inside, outside)
