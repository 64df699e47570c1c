"""The chunked-linear Pallas kernel on its own: TPU interpreter, TPU lowering, argument checks.

Its agreement with the reference over decay kinds, dtypes, GQA and modes runs through the op
(`impl="pallas_interpret"` in tests/ops/linear/test_linear_attention.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attnjax.ops.linear import reference
from kernels_pallas.chunked_linear.tpu import BlockSizes, linear_attention
from tests.helpers import TOL_BLOCKED_F32, assert_close


def inputs(
  seed, batch=1, seq=20, heads=2, kv_heads=1, key_dim=8, value_dim=8, vector=False,
  dtype=jnp.float32,
):  # fmt: skip
  rng = np.random.default_rng(seed)

  def normal(shape, dtype=dtype):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

  decay_dim = key_dim if vector else 1
  log_decay = -np.logaddexp(0.0, rng.standard_normal((batch, seq, heads, decay_dim)))
  return dict(
    q=normal((batch, seq, heads, key_dim)),
    k=normal((batch, seq, kv_heads, key_dim)),
    v=normal((batch, seq, kv_heads, value_dim)),
    log_decay=jnp.asarray(log_decay, jnp.float32),
    initial_state=jnp.asarray(rng.uniform(size=(batch, heads, key_dim, value_dim)), jnp.float32),
  )


def test_tpu_interpreter_matches_reference_with_gradients():
  # Vector decay: its per-row dynamic slicing is what the interpreter's bounds checks guard.
  args = inputs(0, vector=True)
  kernel = functools.partial(
    linear_attention, block_sizes=BlockSizes(16), interpret=pltpu.InterpretParams()
  )
  oracle = functools.partial(reference.linear_attention, causal=True, chunk_size=16)

  def loss(fn, q, k, v, log_decay, initial_state):
    out, final = fn(q, k, v, log_decay=log_decay, initial_state=initial_state)
    return jnp.sum(jnp.sin(out)) + jnp.sum(final**2)

  names = ("q", "k", "v", "log_decay", "initial_state")
  grad = jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5))
  value, grads = grad(kernel, *(args[n] for n in names))
  ref_value, ref_grads = grad(oracle, *(args[n] for n in names))
  assert_close(value, ref_value, TOL_BLOCKED_F32, "loss")
  for name, g, ref_g in zip(names, grads, ref_grads, strict=True):
    assert_close(g, ref_g, 2 * TOL_BLOCKED_F32, f"d{name}")


@pytest.mark.parametrize("vector", [False, True], ids=["scalar_decay", "vector_decay"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(("key_dim", "heads", "kv_heads"), [(128, 2, 1), (60, 3, 3)])
def test_lowers_for_tpu_forward_and_gradient(key_dim, heads, kv_heads, dtype, vector):
  args = inputs(
    1, seq=200, heads=heads, kv_heads=kv_heads, key_dim=key_dim, vector=vector, dtype=dtype
  )
  shapes = {name: jax.ShapeDtypeStruct(x.shape, x.dtype) for name, x in args.items()}

  def forward(q, k, v, log_decay, initial_state):
    return linear_attention(q, k, v, log_decay=log_decay, initial_state=initial_state)

  def loss(*operands):
    out, final = forward(*operands)
    return jnp.sum(out**2) + jnp.sum(final)

  for fn in (forward, jax.grad(loss, argnums=(0, 1, 2, 3, 4))):
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*shapes.values())
    assert "tpu_custom_call" in exported.mlir_module()


def test_block_sizes_are_validated():
  assert BlockSizes().chunk == 64
  for bad in (0, 8, 40):
    with pytest.raises(ValueError, match="chunk must be a positive multiple of 16"):
      BlockSizes(bad)


def test_shape_errors_name_the_argument():
  args = inputs(2, seq=16)
  with pytest.raises(ValueError, match=r"log_decay must be \[batch, seq, heads, 1 \| key_dim\]"):
    linear_attention(**{**args, "log_decay": jnp.zeros((1, 16, 2, 3))})
  with pytest.raises(ValueError, match="initial_state must be"):
    linear_attention(**{**args, "initial_state": jnp.zeros((1, 1, 8, 8))})
  with pytest.raises(ValueError, match="k must be"):
    linear_attention(**{**args, "k": jnp.zeros((1, 16, 3, 8))})
  with pytest.raises(ValueError, match="v must be"):
    linear_attention(**{**args, "v": jnp.zeros((1, 15, 1, 8))})


@pytest.mark.parametrize("vector", [False, True], ids=["scalar_decay", "vector_decay"])
def test_strong_decay_stays_finite_and_exact(vector):
  # Decays down to e^-16 per token: within a 16-token chunk the cumulative log decay reaches
  # about -250, so any e^{-G} factor would overflow float32 (e^88).
  args = inputs(3, seq=48, heads=1, kv_heads=1, key_dim=4, value_dim=4, vector=vector)
  args["log_decay"] = 16.0 * args["log_decay"]
  names = ("q", "k", "v", "log_decay", "initial_state")

  def loss(fn, *operands):
    out, final = fn(*operands)
    return jnp.sum(jnp.sin(out)) + jnp.sum(final**2), (out, final)

  def run_kernel(q, k, v, log_decay, initial_state):
    return linear_attention(
      q, k, v, log_decay=log_decay, initial_state=initial_state, block_sizes=BlockSizes(16),
      interpret=True,
    )  # fmt: skip

  def run_reference(q, k, v, log_decay, initial_state):
    return reference.linear_attention(
      q, k, v, log_decay=log_decay, initial_state=initial_state, causal=True, chunk_size=16
    )

  grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True), static_argnums=0)
  grads, outputs = grad(run_kernel, *(args[n] for n in names))
  ref_grads, ref_outputs = grad(run_reference, *(args[n] for n in names))
  for name, x, ref in zip(("out", "final_state"), outputs, ref_outputs, strict=True):
    assert_close(x, ref, TOL_BLOCKED_F32, name)
  for name, g, ref_g in zip(names, grads, ref_grads, strict=True):
    assert_close(g, ref_g, 2 * TOL_BLOCKED_F32, f"d{name}")
