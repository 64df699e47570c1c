"""Both chunked-linear kernels, interpreted, against the float32 recurrence: outputs, final
states and gradients over decay kinds, causal and bidirectional modes, GQA, odd lengths and head
dims, strong decays and bfloat16; argument checks; the op's adapter."""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.linear import decay, pallas, reference
from kernels_pallas.chunked_linear import gpu, tpu
from tests.helpers import TOL_BLOCKED_F32, assert_close, assert_matches_reference, tolerance

KERNELS = ("tpu", "gpu")
MODULES = {"tpu": tpu, "gpu": gpu}
# 16-token chunks; on GPU block_value=16 splits value dims above 16 over several programs.
BLOCK_SIZES = {"tpu": tpu.BlockSizes(chunk=16), "gpu": gpu.BlockSizes(chunk=16, block_value=16)}


def make_inputs(
  seed, *, batch=1, seq=37, heads=4, kv_heads=2, key_dim=12, value_dim=20, decay_kind="scalar",
  dtype=jnp.float32, strength=1.0,
):  # fmt: skip
  """Kernel operands, the log decay broadcast by the op's own rule."""
  rng = np.random.default_rng(seed)

  def normal(shape):
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
  return dict(
    q=normal((batch, seq, heads, key_dim)),
    k=normal((batch, seq, kv_heads, key_dim)),
    v=normal((batch, seq, kv_heads, value_dim)),
    log_decay=decay.broadcast_log_decay(
      log_decay, batch=batch, seq=seq, heads=heads, key_dim=key_dim
    ),
    initial_state=jnp.asarray(rng.uniform(size=(batch, heads, key_dim, value_dim)), jnp.float32),
  )


def check(kernel_fn, operands, tol, causal, what):
  """`kernel_fn(q, k, v, log_decay=, initial_state=)` vs the recurrence, and its result dtypes."""
  fn = jax.jit(functools.partial(kernel_fn, causal=causal))
  ref = jax.jit(functools.partial(reference.linear_attention, causal=causal, chunk_size=1))
  q, k, v = operands["q"], operands["k"], operands["v"]
  state = dict(log_decay=operands["log_decay"], initial_state=operands["initial_state"])

  def total(q, k, v, state):
    return sum(jnp.sum(x) for x in fn(q, k, v, **state))

  (out, final), grads = jax.eval_shape(
    lambda *a: (fn(*a[:3], **a[3]), jax.grad(total, argnums=(0, 1, 2, 3))(*a)), q, k, v, state
  )
  assert out.shape == q.shape[:3] + v.shape[3:] and out.dtype == final.dtype == jnp.float32
  for grad, operand in zip(jax.tree.leaves(grads), jax.tree.leaves((q, k, v, state)), strict=True):
    assert grad.shape == operand.shape and grad.dtype == operand.dtype, what
  assert_matches_reference(fn, ref, (q, k, v), state, tol, what)


# (decay kind, causal, dtype, heads, kv_heads, key_dim, value_dim, seq, decay strength).
# key_dim 60 and value_dim 10 or 20 are zero-padded on GPU. Strength 16 gives decays down to
# e^-16 per token: the cumulative log decay of a 16-token chunk reaches about -250, so any
# e^{-G} factor would overflow float32.
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
@pytest.mark.parametrize("kernel", KERNELS)
def test_matches_reference(kernel, case):
  decay_kind, causal, dtype, heads, kv_heads, key_dim, value_dim, seq, strength = case
  operands = make_inputs(
    0, seq=seq, heads=heads, kv_heads=kv_heads, key_dim=key_dim, value_dim=value_dim,
    decay_kind=decay_kind, dtype=dtype, strength=strength,
  )  # fmt: skip
  run = functools.partial(
    MODULES[kernel].linear_attention, block_sizes=BLOCK_SIZES[kernel], interpret=True
  )
  check(run, operands, tolerance(dtype), causal, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
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
def test_matches_reference_over_shapes(
  kernel, seq, kv_heads, groups, key_dim, value_dim, decay_kind, seed
):
  operands = make_inputs(
    seed, seq=seq, heads=kv_heads * groups, kv_heads=kv_heads, key_dim=key_dim,
    value_dim=value_dim, decay_kind=decay_kind,
  )  # fmt: skip
  module = MODULES[kernel]
  run = functools.partial(
    module.linear_attention, block_sizes=module.BlockSizes(32), interpret=True
  )
  check(run, operands, TOL_BLOCKED_F32, True, f"{kernel} seq={seq}")


@pytest.mark.parametrize("kernel, name", [("tpu", "chunked_linear_fwd"), ("gpu", "_fwd_gpu")])
def test_adapter_rounds_the_chunk_and_runs_the_kernel(kernel, name):
  """`chunk_size=10` rounds up to a chunk the kernel tiles (TPU: 128, GPU: 16); the traced
  program is it."""
  operands = make_inputs(2, seq=23, key_dim=8, value_dim=8)
  run = functools.partial(
    pallas.linear_attention, **operands, causal=True, chunk_size=10, interpret=True, kernel=kernel
  )
  traced = str(jax.make_jaxpr(run)())
  assert name in traced and ("_gpu" in traced) == (kernel == "gpu")
  ref = reference.linear_attention(**operands, causal=True, chunk_size=1)
  for x, ref_x, what in zip(run(), ref, ("out", "final_state"), strict=True):
    assert_close(x, ref_x, TOL_BLOCKED_F32, what)


def test_adapter_rejects_unknown_kernels():
  with pytest.raises(ValueError, match="kernel must be"):
    pallas.linear_attention(
      **make_inputs(4, seq=4), causal=True, chunk_size=16, interpret=True, kernel="cpu"
    )


# (kernel, seq, heads, kv_heads, key_dim, value_dim): 200 and 300 tokens pad to 208 and 320,
# not powers of two (only the tiles a kernel loads must be); key_dim 60 is padded on GPU.
LOWERING = [("tpu", 200, 2, 1, 128, 8), ("tpu", 200, 3, 3, 60, 8), ("gpu", 300, 4, 2, 60, 60)]
PLATFORMS = {"tpu": ("tpu", "tpu_custom_call"), "gpu": ("cuda", "__gpu$xla.gpu.triton")}
# Kernel launches of (forward, gradient): TPU forward and backward; GPU state pass and output
# pass, then the gradient's recomputed state pass, state-gradient pass and chunk-parallel pass.
LAUNCHES = {"tpu": (1, 2), "gpu": (2, 5)}


@pytest.mark.parametrize("vector", [False, True], ids=["scalar_decay", "vector_decay"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kernel, seq, heads, kv_heads, key_dim, value_dim", LOWERING)
def test_lowers_forward_and_gradient(kernel, seq, heads, kv_heads, key_dim, value_dim, dtype,
                                     vector):  # fmt: skip
  shapes = [
    jax.ShapeDtypeStruct((1, seq, heads, key_dim), dtype),
    jax.ShapeDtypeStruct((1, seq, kv_heads, key_dim), dtype),
    jax.ShapeDtypeStruct((1, seq, kv_heads, value_dim), dtype),
    jax.ShapeDtypeStruct((1, seq, heads, key_dim if vector else 1), jnp.float32),
    jax.ShapeDtypeStruct((1, heads, key_dim, value_dim), jnp.float32),
  ]

  def forward(q, k, v, log_decay, initial_state):
    return MODULES[kernel].linear_attention(
      q, k, v, log_decay=log_decay, initial_state=initial_state
    )

  def loss(*operands):
    out, final = forward(*operands)
    return jnp.sum(out**2) + jnp.sum(final)

  platform, custom_call = PLATFORMS[kernel]
  # Triton custom calls carry no serialization-compatibility guarantee; lowering is the check.
  unchecked = [jax.export.DisabledSafetyCheck.custom_call(custom_call)] if kernel == "gpu" else []
  gradient = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
  for fn, kernels in zip((forward, gradient), LAUNCHES[kernel], strict=True):
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=unchecked)
    assert exported(*shapes).mlir_module().count(custom_call) == kernels


@pytest.mark.parametrize("kernel", KERNELS)
def test_shape_errors_name_the_argument(kernel):
  operands = make_inputs(5, seq=16, heads=2, kv_heads=1, key_dim=8, value_dim=8)
  run = functools.partial(MODULES[kernel].linear_attention, interpret=True)
  bad = {
    r"log_decay must be \[batch, seq, heads, 1 \| key_dim\]": ("log_decay", (1, 16, 2, 3)),
    "initial_state must be": ("initial_state", (1, 1, 8, 8)),
    "k must be": ("k", (1, 16, 3, 8)),
    "v must be": ("v", (1, 15, 1, 8)),
  }
  for message, (name, shape) in bad.items():
    with pytest.raises(ValueError, match=message):
      run(**{**operands, name: jnp.zeros(shape)})
