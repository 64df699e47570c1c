"""The registry: lookup, dispatch with fallback, and the README table generated from it."""

import pathlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import attnjax as aj
from attnjax import registry
from configs import mqar
from kernels_pallas import common as kernel_common
from tests.helpers import kernel_on_cpu

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


def _impls():
  def pallas(x, *, kernel):
    return x + {"tpu": 10.0, "gpu": 20.0}[kernel]

  return {"pallas": pallas, "xla": lambda x: x + 1.0, "reference": lambda x: x + 2.0}


def test_dispatch_lowers_the_kernel_of_the_platform_compiled_for(monkeypatch):
  x = jnp.zeros(())
  for kernel, offset in (("tpu", 10.0), ("gpu", 20.0)):
    kernel_on_cpu(monkeypatch, kernel)
    for impl in ("pallas", "auto"):
      assert jax.jit(lambda x, impl=impl: registry.dispatch(_impls(), impl, x))(x) == offset
    assert registry.dispatch(_impls(), "xla", x) == 1.0


def test_auto_lowers_xla_where_no_kernel_and_pallas_fails_clearly(monkeypatch):
  x = jnp.zeros(())
  monkeypatch.setattr(kernel_common, "compilable_kernels", lambda: ("tpu",))  # lowered for CPU
  assert jax.jit(lambda x: registry.dispatch(_impls(), "auto", x))(x) == 1.0
  with pytest.raises(registry.Unsupported, match=r"platforms \('tpu',\).*runs on \('cpu',\)"):
    jax.jit(lambda x: registry.dispatch(_impls(), "pallas", x))(x)
  monkeypatch.setattr(kernel_common, "compilable_kernels", lambda: ())  # a CPU-only install
  assert registry.dispatch(_impls(), "auto", x) == 1.0
  with pytest.raises(registry.Unsupported, match="no Pallas kernel compiles on this installation"):
    registry.dispatch(_impls(), "pallas", x)


def test_auto_dispatch_falls_back_past_unsupported(monkeypatch):
  def unsupported(x, **kwargs):
    raise registry.Unsupported("not here")

  kernel_on_cpu(monkeypatch, "tpu")
  impls = {"pallas": unsupported, "xla": unsupported, "reference": lambda x: x + 2}
  assert registry.dispatch(impls, "auto", 1) == 3
  with pytest.raises(registry.Unsupported, match="not here"):
    registry.dispatch(impls, "pallas", 1)
  with pytest.raises(ValueError, match="impl must be one of"):
    registry.dispatch(impls, "triton", 1)


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
  assert seen == [("linear", ["feature_map", "impl", "normalize", "scale"])]
  assert jnp.array_equal(inside, outside)


@pytest.mark.parametrize(
  "fields, match",
  [
    (dict(causal=True, bidirectional=True), "causal= keyword"),
    (dict(causal=False, causal_keyword=True), "causal= keyword"),
    (dict(causal=False, bidirectional=False), "causal= keyword"),
    (dict(causal=True, split="rows"), "split must be one of"),
    (dict(causal=True, split="heads"), "needs an op that returns its lse"),
    (dict(causal=False, bidirectional=True, split="state"), "only causal variants"),
  ],
)
def test_capabilities_refuse_contradictions(fields, match):
  with pytest.raises(ValueError, match=match):
    registry.Capabilities(**fields)


def _squared_relu_attention(q, k, v, *, impl="auto"):
  """A variant defined in a test: causal `relu(q k^T * scale)^2 v` (no paper)."""
  del impl
  scale = q.shape[-1] ** -0.5
  k, v = (jnp.repeat(x, q.shape[2] // x.shape[2], axis=2) for x in (k, v))
  scores = jax.nn.relu(jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale) ** 2
  scores = jnp.where(jnp.tril(jnp.ones(scores.shape[-2:], bool)), scores, 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", scores, v)


@pytest.fixture
def squared_relu():
  caps = registry.Capabilities(causal=True)
  variant = registry.register(
    "squared_relu",
    _squared_relu_attention,
    family="softmax",
    paper="(test)",
    description="causal squared-relu attention",
    capabilities=caps,
    impls=("reference",),
    module="attnjax.nn.attention:Attention",
  )
  yield variant
  del registry._REGISTRY["squared_relu"]


def test_a_registered_variant_reaches_configs_models_and_the_table_with_no_other_edit(
  squared_relu,
):
  assert "squared_relu" in registry.names() and "squared_relu" in mqar.causal_presets()
  config = mqar.get_config("hybrid_squared_relu")
  assert config.model.layer_pattern == "squared_relu,softmax"
  assert "| `squared_relu` | softmax | reference | causal, gqa |" in registry.markdown_table()
  model = aj.nn.DecoderLM(
    vocab_size=16,
    embed_dim=16,
    depth=2,
    num_heads=2,
    mlp_dim=0,
    rngs=nnx.Rngs(0),
    layer_pattern=config.model.layer_pattern,
  )
  logits = model(jnp.zeros((1, 5), jnp.int32) + jnp.arange(5))
  assert logits.shape == (1, 5, 16) and bool(jnp.all(jnp.isfinite(logits)))
  (args, kwargs) = squared_relu.example_inputs(jax.random.key(0))
  assert squared_relu.reference(*args, **kwargs).shape == args[0].shape


@pytest.mark.parametrize(
  "options, match",
  [
    (dict(impls=("xla",)), "must include 'reference'"),
    (dict(impls=("reference", "triton")), "must include 'reference'"),
    (dict(family="conv"), "family"),
    (dict(capabilities=registry.Capabilities(causal=True, lse=True, split="mask")), "preset"),
    (dict(name="softmax"), "already registered"),
  ],
)
def test_register_refuses_an_inconsistent_declaration(options, match):
  declaration = dict(
    name="bad",
    op=_squared_relu_attention,
    family="softmax",
    paper="(test)",
    description="",
    capabilities=registry.Capabilities(causal=True),
  )
  declaration.update(options)
  with pytest.raises(ValueError, match=match):
    registry.register(declaration.pop("name"), declaration.pop("op"), **declaration)
  assert "bad" not in registry.names()
