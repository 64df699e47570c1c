"""The real XLA:GPU + Triton + ptxas on compile-only GPU devices (needs the CUDA plugin).

Kernel choice follows the platform compiled for: the public ops lower their Triton kernels for
CUDA. The CI subset of `benchmarks/gpu_compile.py` compiles for H200 (sm_90a) and A100
(sm_80); `python benchmarks/gpu_compile.py` runs the whole matrix. Float32 matmuls follow
`jax.default_matmul_precision`: TF32 in the PTX by default, none under "highest".
"""

import functools

import jax
import jax.numpy as jnp
import pytest

import attnjax as aj
from attnjax import aot
from benchmarks import gpu_compile
from tests.helpers import TOL_BLOCKED_F32, assert_close, random_normal

pytestmark = [
  pytest.mark.gpu_compile,
  pytest.mark.skipif(
    not aot.cuda_plugin_installed(),
    reason="needs the CUDA plugin: pip install -r requirements-compile.txt",
  ),
]

PUBLIC_OPS = {
  "dot_product_attention": functools.partial(
    aj.ops.dot_product_attention, mask=aj.masks.causal() & aj.masks.sliding_window(100)
  ),
  "linear_attention": aj.ops.linear_attention,
  "delta_rule_attention": lambda q, k, v, impl: aj.ops.delta_rule_attention(
    q, k, v, jnp.full(q.shape[:3], 0.5), impl=impl
  ),
  "neighborhood_attention": functools.partial(aj.ops.neighborhood_attention, kernel_size=31),
}


@pytest.fixture(autouse=True, scope="module")
def _gpu_compiler():
  """Compile-only GPU devices exist before any test traces: only then are GPU kernels traced."""
  aot.gpu_devices("h200")


def _shapes(dtype, seq=512, heads=4, kv_heads=2, head_dim=64):
  q = jax.ShapeDtypeStruct((1, seq, heads, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((1, seq, kv_heads, head_dim), dtype)
  return q, kv, kv


def _grad(op):
  def loss(q, k, v):
    return jnp.sum(op(q, k, v).astype(jnp.float32) ** 2)

  return jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.parametrize("impl", ["auto", "pallas"])
@pytest.mark.parametrize("name", PUBLIC_OPS)
def test_public_ops_lower_their_triton_kernels_when_compiled_for_a_gpu(name, impl):
  op = functools.partial(PUBLIC_OPS[name], impl=impl)
  compiled, kernels = aot.compile_for_gpu(
    _grad(op), aot.gpu_devices("h200")[0], *_shapes(jnp.bfloat16)
  )
  assert aot.custom_calls(compiled)["__gpu$xla.gpu.triton"] >= 2  # forward and backward
  assert kernels and all(k.shared_memory > 0 and k.registers > 0 for k in kernels)


@pytest.mark.parametrize("name", PUBLIC_OPS)
def test_auto_lowers_xla_for_this_host_with_gpu_devices_made(name):
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  q = random_normal(keys[0], (1, 77, 4, 16), jnp.float32)
  k, v = (random_normal(key, (1, 77, 2, 16), jnp.float32) for key in keys[1:])
  auto = jax.jit(_grad(functools.partial(PUBLIC_OPS[name], impl="auto")))
  assert not aot.custom_calls(auto.lower(q, k, v).compile())
  ref = _grad(functools.partial(PUBLIC_OPS[name], impl="reference"))
  for got, want in zip(auto(q, k, v), ref(q, k, v), strict=True):
    assert_close(got, want, TOL_BLOCKED_F32, name)


@pytest.mark.parametrize("name", PUBLIC_OPS)
def test_float32_matmuls_follow_default_matmul_precision(name):
  """TF32 MMAs by default (as XLA's GPU dots), none under "highest": exact float32."""
  op = functools.partial(PUBLIC_OPS[name], impl="pallas")
  device = aot.gpu_devices("h200")[0]
  shapes = _shapes(jnp.float32)
  _, default = aot.compile_for_gpu(_grad(op), device, *shapes)
  assert any(k.tf32 for k in default)

  def highest(*inputs):
    with jax.default_matmul_precision("highest"):
      return _grad(op)(*inputs)

  _, exact = aot.compile_for_gpu(highest, device, *shapes)
  assert exact and not any(k.tf32 for k in exact)


@pytest.mark.parametrize("gpu", gpu_compile.GPUS)
@pytest.mark.parametrize("case", gpu_compile.ci_cases(), ids=lambda c: c.label)
def test_ci_subset_compiles(case, gpu):
  result = gpu_compile.compile_case(case, gpu)
  assert result.ok, result.error
  limit = {"h200": 232448, "a100": 166912}[gpu]  # shared_memory_per_block_optin
  assert 0 < result.shared_memory <= limit


def test_gpu_devices_reject_unknown_targets():
  with pytest.raises(ValueError, match=r"target must be one of \['a100', 'h200'\]"):
    aot.gpu_devices("h300")
