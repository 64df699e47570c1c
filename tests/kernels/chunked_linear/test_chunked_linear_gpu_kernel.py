"""Triton (GPU) chunked-linear kernel: the Pallas interpreter against the float32 recurrence on
outputs, final states and gradients; lowering for CUDA with `jax.export` on CPU; argument checks.
"""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops import linear_attention
from attnjax.ops.linear import api, decay, pallas, reference
from kernels_pallas.chunked_linear import gpu
from tests.helpers import TOL_BLOCKED_F32, assert_close, tolerance

NAMES = ("q", "k", "v", "log_decay", "initial_state")


def make_inputs(
  seed, *, batch=1, seq=37, heads=4, kv_heads=2, key_dim=12, value_dim=20, decay_kind="scalar",
  dtype=jnp.float32, strength=1.0,
):  # fmt: skip
  """Kernel operands (log decay broadcast by the op's own rule) and output cotangents."""
  rng = np.random.default_rng(seed)

  def normal(shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

  decay_shape = {
    "none": None,
    "head": (heads,),
    "scalar": (batch, seq, heads),
    "vector": (batch, seq, heads, key_dim),
  }[decay_kind]
  log_decay = None
  if decay_shape is not None:
    log_decay = -strength * np.logaddexp(0.0, rng.standard_normal(decay_shape) - 1.0)
  operands = dict(
    q=normal((batch, seq, heads, key_dim), dtype),
    k=normal((batch, seq, kv_heads, key_dim), dtype),
    v=normal((batch, seq, kv_heads, value_dim), dtype),
    log_decay=decay.broadcast_log_decay(
      log_decay, batch=batch, seq=seq, heads=heads, key_dim=key_dim
    ),
    initial_state=jnp.asarray(rng.uniform(size=(batch, heads, key_dim, value_dim)), jnp.float32),
  )
  cotangents = (normal((batch, seq, heads, value_dim)), normal((batch, heads, key_dim, value_dim)))
  return operands, cotangents


def outputs_and_grads(fn, operands, cotangents):
  """(out, final_state) of `fn` and the gradients of `<(out, final_state), cotangents>`."""

  def run(q, k, v, log_decay, initial_state):
    return fn(q, k, v, log_decay=log_decay, initial_state=initial_state)

  outputs, vjp = jax.vjp(run, *(operands[name] for name in NAMES))
  return outputs, vjp(cotangents)


def assert_matches_reference(kernel, operands, cotangents, tol, causal):
  oracle = functools.partial(reference.linear_attention, causal=causal, chunk_size=1)
  (out, final), grads = jax.jit(functools.partial(outputs_and_grads, kernel))(operands, cotangents)
  upcast = {name: x.astype(jnp.float32) for name, x in operands.items()}
  (ref_out, ref_final), ref_grads = outputs_and_grads(oracle, upcast, cotangents)
  assert out.shape == ref_out.shape and final.shape == ref_final.shape
  assert_close(out, ref_out, tol, "out")
  assert_close(final, ref_final, tol, "final_state")
  for name, grad, ref_grad in zip(NAMES, grads, ref_grads, strict=True):
    assert grad.shape == ref_grad.shape and grad.dtype == operands[name].dtype, name
    assert_close(grad, ref_grad, 2 * tol, f"d{name}")


# (decay kind, causal, dtype, heads, kv_heads, key_dim, value_dim, seq, decay strength).
# block_value=16 splits value dims above 16 over several programs; key_dim 60 and value_dim 10
# or 20 are zero-padded. Strength 16 gives decays down to e^-16 per token: the cumulative log
# decay of a 16-token chunk reaches about -250, so any e^{-G} factor would overflow float32.
CASES = {
  "scalar-causal-gqa-dk60": ("scalar", True, jnp.float32, 4, 2, 60, 20, 37, 1.0),
  "vector-causal-gqa": ("vector", True, jnp.float32, 4, 2, 12, 20, 37, 1.0),
  "none-bidirectional-mqa": ("none", False, jnp.float32, 2, 1, 60, 10, 21, 1.0),
  "head-causal-mha": ("head", True, jnp.float32, 3, 3, 16, 16, 50, 1.0),
  "scalar-strong-decay": ("scalar", True, jnp.float32, 1, 1, 4, 4, 48, 16.0),
  "vector-strong-decay": ("vector", True, jnp.float32, 1, 1, 4, 4, 48, 16.0),
  "scalar-bf16-gqa": ("scalar", True, jnp.bfloat16, 4, 2, 60, 20, 37, 1.0),
  "vector-bf16-gqa": ("vector", True, jnp.bfloat16, 4, 2, 12, 20, 37, 1.0),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_interpreted_kernel_matches_reference(case):
  decay_kind, causal, dtype, heads, kv_heads, key_dim, value_dim, seq, strength = case
  operands, cotangents = make_inputs(
    0, seq=seq, heads=heads, kv_heads=kv_heads, key_dim=key_dim, value_dim=value_dim,
    decay_kind=decay_kind, dtype=dtype, strength=strength,
  )  # fmt: skip
  kernel = functools.partial(
    gpu.linear_attention,
    causal=causal,
    block_sizes=gpu.BlockSizes(chunk=16, block_value=16),
    interpret=True,
  )
  assert_matches_reference(kernel, operands, cotangents, tolerance(dtype), causal)


@hypothesis.settings(max_examples=3)
@hypothesis.given(
  seq=st.integers(1, 70),
  kv_heads=st.sampled_from([1, 2]),
  groups=st.sampled_from([1, 3]),
  key_dim=st.sampled_from([4, 60, 64]),
  value_dim=st.sampled_from([8, 60]),
  decay_kind=st.sampled_from(["none", "head", "scalar", "vector"]),
  seed=st.integers(0, 2**16),
)
def test_interpreted_kernel_matches_reference_over_shapes(
  seq, kv_heads, groups, key_dim, value_dim, decay_kind, seed
):
  operands, cotangents = make_inputs(
    seed, seq=seq, heads=kv_heads * groups, kv_heads=kv_heads, key_dim=key_dim,
    value_dim=value_dim, decay_kind=decay_kind,
  )  # fmt: skip
  kernel = functools.partial(gpu.linear_attention, block_sizes=gpu.BlockSizes(32), interpret=True)
  assert_matches_reference(kernel, operands, cotangents, TOL_BLOCKED_F32, causal=True)


def test_op_routes_to_the_gpu_kernel(monkeypatch):
  """`kernel="gpu"` through the op: chunk_size 10 rounds up to a Triton tile, the feature map
  and normalizer are applied around the kernel, and the traced program is the Triton one."""
  interpreted = functools.partial(pallas.linear_attention, interpret=True, kernel="gpu")
  monkeypatch.setitem(api.IMPLS, "pallas_interpret", interpreted)
  operands, _ = make_inputs(2, seq=23, key_dim=8, value_dim=8)
  q, k, v = operands["q"], operands["k"], operands["v"]
  log_decay = jnp.asarray(decay.lightning_log_decay(q.shape[2]))
  run = functools.partial(
    linear_attention, q, k, v, log_decay=log_decay, feature_map="elu+1", normalize=True,
    chunk_size=10,
  )  # fmt: skip
  traced = jax.make_jaxpr(lambda: run(impl="pallas_interpret"))()
  assert "chunked_linear_fwd_gpu" in str(traced)
  assert_close(run(impl="pallas_interpret"), run(impl="reference"), TOL_BLOCKED_F32, "out")


@pytest.mark.parametrize("vector", [False, True], ids=["scalar_decay", "vector_decay"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_lowers_for_cuda_forward_and_gradient(dtype, vector):
  # 300 tokens pad to 320, not a power of two: only the tiles the kernel loads must be.
  operands, _ = make_inputs(
    3, seq=300, heads=4, kv_heads=2, key_dim=60, value_dim=60,
    decay_kind="vector" if vector else "scalar", dtype=dtype,
  )  # fmt: skip
  shapes = [jax.ShapeDtypeStruct(operands[name].shape, operands[name].dtype) for name in NAMES]

  def forward(q, k, v, log_decay, initial_state):
    return gpu.linear_attention(q, k, v, log_decay=log_decay, initial_state=initial_state)

  def loss(*operands):
    out, final = forward(*operands)
    return jnp.sum(out**2) + jnp.sum(final)

  # Triton custom calls carry no serialization-compatibility guarantee; lowering is the check.
  triton = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  for fn, kernels in ((forward, 1), (jax.grad(loss, argnums=(0, 1, 2, 3, 4)), 2)):
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=triton)(*shapes)
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == kernels


def test_block_sizes_are_validated():
  assert gpu.BlockSizes() == gpu.BlockSizes(chunk=64, block_value=64, num_warps=4, num_stages=1)
  for bad in (0, 8, 24, 48):
    with pytest.raises(ValueError, match="chunk must be a power of two >= 16"):
      gpu.BlockSizes(chunk=bad)
  with pytest.raises(ValueError, match="block_value must be a power of two >= 16"):
    gpu.BlockSizes(block_value=40)
  with pytest.raises(ValueError, match="num_warps"):
    gpu.BlockSizes(num_warps=3)
  with pytest.raises(ValueError, match="num_stages"):
    gpu.BlockSizes(num_stages=0)
  operands, _ = make_inputs(4, seq=4)
  with pytest.raises(ValueError, match="kernel must be"):
    pallas.linear_attention(**operands, causal=True, chunk_size=16, interpret=True, kernel="cpu")


def test_shape_errors_name_the_argument():
  operands, _ = make_inputs(5, seq=16, heads=2, kv_heads=1, key_dim=8, value_dim=8)
  with pytest.raises(ValueError, match=r"log_decay must be \[batch, seq, heads, 1 \| key_dim\]"):
    gpu.linear_attention(**{**operands, "log_decay": jnp.zeros((1, 16, 2, 3))}, interpret=True)
  with pytest.raises(ValueError, match="initial_state must be"):
    gpu.linear_attention(**{**operands, "initial_state": jnp.zeros((1, 1, 8, 8))}, interpret=True)
