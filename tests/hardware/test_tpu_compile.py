"""The real XLA:TPU + Mosaic compiler on compile-only devices (needs libtpu).

Kernel choice follows the platform compiled for: the public ops lower their Mosaic kernels
for TPU and XLA for this CPU host. The CI subset of `benchmarks/tpu_compile.py` compiles on
every generation; `python benchmarks/tpu_compile.py` runs the whole matrix.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

import attnjax as aj
from attnjax import aot, registry
from benchmarks import tpu_compile
from tests.helpers import TOL_BLOCKED_F32, assert_close, random_normal

pytestmark = [
  pytest.mark.tpu_compile,
  pytest.mark.skipif(
    not aot.libtpu_installed(), reason="needs libtpu: pip install -r requirements-compile.txt"
  ),
]


@pytest.fixture(autouse=True, scope="module")
def _tpu_compiler():
  """Compile-only TPU devices exist before any test traces: only then are TPU kernels traced."""
  aot.tpu_devices("v5e:2x2")


PUBLIC_OPS = {
  "dot_product_attention": functools.partial(
    aj.ops.dot_product_attention, mask=aj.masks.causal() & aj.masks.sliding_window(100)
  ),
  "linear_attention": aj.ops.linear_attention,
  "neighborhood_attention": functools.partial(aj.ops.neighborhood_attention, kernel_size=31),
}


def _qkv(seq=512, heads=4, kv_heads=2, head_dim=128, dtype=jnp.bfloat16):
  keys = jax.random.split(jax.random.PRNGKey(seq), 3)
  q = random_normal(keys[0], (1, seq, heads, head_dim), dtype)
  k, v = (random_normal(key, (1, seq, kv_heads, head_dim), dtype) for key in keys[1:])
  return q, k, v


def _value_and_grads(op):
  def f(q, k, v):
    out = op(q, k, v)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  return jax.value_and_grad(f, argnums=(0, 1, 2))


@pytest.mark.parametrize("impl", ["auto", "pallas"])
@pytest.mark.parametrize("name", PUBLIC_OPS)
def test_public_ops_lower_their_mosaic_kernels_when_compiled_for_tpu(name, impl):
  op = functools.partial(PUBLIC_OPS[name], impl=impl)
  compiled = aot.compile_for(_value_and_grads(op), aot.tpu_devices("v5e:2x2")[:1], *_qkv())
  assert aot.custom_calls(compiled)["tpu_custom_call"] >= 2  # forward and backward kernels


@pytest.mark.parametrize("name", PUBLIC_OPS)
def test_auto_lowers_xla_for_this_host_with_tpu_devices_made(name):
  q, k, v = _qkv(seq=77, heads=4, kv_heads=2, head_dim=16, dtype=jnp.float32)
  auto = jax.jit(_value_and_grads(functools.partial(PUBLIC_OPS[name], impl="auto")))
  assert not aot.custom_calls(auto.lower(q, k, v).compile())
  ref = _value_and_grads(functools.partial(PUBLIC_OPS[name], impl="reference"))
  for got, want in zip(jax.tree.leaves(auto(q, k, v)), jax.tree.leaves(ref(q, k, v)), strict=True):
    assert_close(got, want, TOL_BLOCKED_F32, name)


def test_pallas_compiled_for_this_host_names_the_platform():
  with pytest.raises(registry.Unsupported, match=r"runs on \('cpu',\)"):
    jax.jit(functools.partial(aj.ops.linear_attention, impl="pallas")).lower(*_qkv()).compile()


@pytest.mark.parametrize("generation", list(aot.GENERATIONS))
@pytest.mark.parametrize("case", tpu_compile.ci_cases(), ids=lambda c: c.label)
def test_ci_matrix_compiles(case, generation):
  result = tpu_compile.compile_case(case, generation)
  assert result.ok, f"{case.label} on {generation}: {result.error}"
  vmem = aot.chip_memory(aot.tpu_devices(aot.GENERATIONS[generation])[0]).vmem
  assert 0 < result.vmem_bytes <= vmem
