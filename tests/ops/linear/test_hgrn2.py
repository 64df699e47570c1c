"""HGRN2 (`hgrn2_attention`) against the paper's recurrence written token by token.

The oracle transcribes Eq. 3 of Qin et al. 2024 directly: `f_t = beta + (1 - beta)
sigmoid(z_t)`, `h_t = Diag{f_t} h_{t-1} + (1 - f_t)^T i_t`, `y_t = (scale o_t) h_t`. Every
implementation matches it on outputs, final states and the gradients of every input; the
forget gate's log is checked in float64 over extreme logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import registry
from attnjax.ops import hgrn2_attention, linear_attention
from attnjax.ops.linear import hgrn2
from tests.helpers import (
  TOL_BF16,
  TOL_BLOCKED_F32,
  TOL_EXACT_F32,
  assert_close,
  assert_matches_reference,
)

BATCH, SEQ, HEADS, KV_HEADS, KEY_DIM, VALUE_DIM = 2, 37, 4, 2, 12, 10
IMPLS = ["reference", "xla", "pallas_interpret"]


def make_inputs(seed, *, seq=SEQ, dtype=jnp.float32, logit_scale=2.0):
  """Fresh (q, forget_logits, v, lower_bound, initial_state); q, z, v in `dtype`."""
  rng = np.random.default_rng(seed)

  def normal(shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32).astype(dtype)

  q = normal((BATCH, seq, HEADS, KEY_DIM))
  forget_logits = normal((BATCH, seq, KV_HEADS, KEY_DIM), logit_scale)
  v = normal((BATCH, seq, KV_HEADS, VALUE_DIM))
  lower_bound = jnp.asarray(rng.uniform(0.0, 0.9, (KV_HEADS, KEY_DIM)), jnp.float32)
  state = jnp.asarray(rng.uniform(-1.0, 1.0, (BATCH, HEADS, KEY_DIM, VALUE_DIM)), jnp.float32)
  return q, forget_logits, v, lower_bound, state


def paper_hgrn2(q, forget_logits, v, lower_bound, initial_state, *, scale=KEY_DIM**-0.5):
  """Eq. 3 token by token in float32: `(out [b, t, h, e], h_T [b, h, d, e])`.

  Query head `n` reads the forget gate and input of kv head `n // groups`.
  """
  groups = q.shape[2] // v.shape[2]
  q, z, v = (jnp.asarray(x, jnp.float32) for x in (q, forget_logits, v))
  f = lower_bound + (1.0 - lower_bound) * jax.nn.sigmoid(z)  # [b, t, hk, d]
  f, i = jnp.repeat(f, groups, axis=2), jnp.repeat(v, groups, axis=2)
  h = initial_state
  outs = []
  for t in range(q.shape[1]):
    h = f[:, t, :, :, None] * h + jnp.einsum("bhd,bhe->bhde", 1.0 - f[:, t], i[:, t])
    outs.append(jnp.einsum("bhd,bhde->bhe", scale * q[:, t], h))
  return jnp.stack(outs, axis=1), h


def op(impl, *, chunk_size=16, **options):
  """`hgrn2_attention` with the paper's tied keys, as a function of the oracle's inputs."""

  def run(q, forget_logits, v, lower_bound, initial_state):
    return hgrn2_attention(
      q,
      hgrn2.hgrn2_keys(forget_logits, lower_bound),
      v,
      forget_logits=forget_logits,
      lower_bound=lower_bound,
      initial_state=initial_state,
      return_final_state=True,
      chunk_size=chunk_size,
      impl=impl,
      **options,
    )

  return run


@pytest.mark.parametrize("impl", IMPLS)
def test_every_implementation_is_the_papers_recurrence_with_gradients(impl):
  tol = TOL_EXACT_F32 if impl == "reference" else TOL_BLOCKED_F32
  assert_matches_reference(op(impl), paper_hgrn2, make_inputs(0), {}, tol, f"hgrn2 {impl}")


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_bfloat16_inputs(impl):
  q, z, v, lower_bound, state = make_inputs(1, dtype=jnp.bfloat16)
  out, final = op(impl)(q, z, v, lower_bound, state)
  assert out.dtype == jnp.bfloat16 and final.dtype == jnp.float32

  # Gradients of the bfloat16 inputs and the float32 state. The float32 lower bound is held
  # fixed: its gradient sums the per-token decay gradients over the batch and sequence, and
  # the Pallas kernel's bfloat16 matmul operands give those a shared bias (3.5e-2 after the sum,
  # 5.5e-3 per token; XLA: 4e-3); its float32 gradient is checked above.
  def fixed_bound(fn):
    return lambda q, z, v, s: fn(q, z, v, lower_bound, s)

  assert_matches_reference(
    fixed_bound(op(impl)), fixed_bound(paper_hgrn2), (q, z, v, state), {}, TOL_BF16, impl
  )


def test_bidirectional_tokens_read_the_final_state():
  q, z, v, lower_bound, state = make_inputs(2)
  _, final = paper_hgrn2(q, z, v, lower_bound, state)
  expected = jnp.einsum("bthd,bhde->bthe", q * KEY_DIM**-0.5, final)
  out, _ = op("xla", causal=False)(q, z, v, lower_bound, state)
  assert_close(out, expected, TOL_BLOCKED_F32, "bidirectional")


def test_one_token_steps_equal_the_sequence_op():
  q, z, v, lower_bound, state = make_inputs(3, seq=13)
  k = hgrn2.hgrn2_keys(z, lower_bound)
  full, final = op("xla", chunk_size=4)(q, z, v, lower_bound, state)
  step = jax.jit(registry.get("hgrn2").step)
  outs = []
  for t in range(q.shape[1]):
    out_t, state = step(
      q[:, t], k[:, t], v[:, t], state, forget_logits=z[:, t : t + 1], lower_bound=lower_bound
    )
    outs.append(out_t)
  assert_close(jnp.stack(outs, axis=1), full, TOL_BLOCKED_F32, "decoded outputs")
  assert_close(state, final, TOL_BLOCKED_F32, "decoded state")


def test_preset_is_the_linear_attention_call():
  q, z, v, lower_bound, state = make_inputs(4, seq=19)
  k = hgrn2.hgrn2_keys(z, lower_bound)
  kwargs = dict(forget_logits=z, lower_bound=lower_bound, initial_state=state, impl="reference")
  base = hgrn2.hgrn2_keywords(kwargs, HEADS)
  assert sorted(base) == ["impl", "initial_state", "log_decay"]
  assert base["log_decay"].shape == (BATCH, 19, HEADS, KEY_DIM)
  want = hgrn2_attention(q, k, v, **kwargs)
  assert_close(linear_attention(q, k, v, **base), want, TOL_EXACT_F32, "preset")


def _extreme_logits():
  grid = np.concatenate([-np.logspace(-3, 4, 40), [0.0], np.logspace(-3, 4, 40)])
  return jnp.asarray(grid.reshape(1, -1, 1, 1), jnp.float32)


@pytest.mark.parametrize("lower_bound", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_forget_gate_in_log_space_is_finite_exact_and_above_its_bound(lower_bound):
  z = _extreme_logits()
  log_forget = hgrn2.hgrn2_log_forget(z, lower_bound)
  keys = hgrn2.hgrn2_keys(z, lower_bound)
  assert np.all(np.isfinite(log_forget)) and np.all(log_forget <= 0.0)
  beta = np.float64(np.float32(lower_bound))
  z64 = np.asarray(z, np.float64)
  # f = beta + (1 - beta) sigmoid(z) and 1 - f in float64, with sigmoid(-z) for the key.
  with np.errstate(over="ignore"):
    f64 = beta + (1 - beta) / (1 + np.exp(-z64))
    keys64 = (1 - beta) / (1 + np.exp(z64))
  # float64 log f: from the key where f is near 1 (1 - 1e-14 has few digits left in f64).
  log_f64 = np.where(
    keys64 < 0.5, np.log1p(-np.minimum(keys64, 0.5)), np.log(np.maximum(f64, 1e-300))
  )
  # Decays below the smallest normal float32 (~1e-38) are floored there: they act as 0.
  representable = f64 > 1e-37
  np.testing.assert_allclose(
    np.asarray(log_forget)[representable], log_f64[representable], rtol=2e-6, atol=1e-30
  )
  np.testing.assert_allclose(np.asarray(keys), keys64, rtol=2e-6, atol=1e-38)
  assert np.all(np.exp(np.asarray(log_forget, np.float64)) >= beta * (1 - 1e-6))
  assert np.all(np.asarray(keys) <= 1 - beta)
  grads = jax.grad(
    lambda z, beta: hgrn2.hgrn2_log_forget(z, beta).sum() + hgrn2.hgrn2_keys(z, beta).sum(),
    argnums=(0, 1),
  )(z, jnp.float32(lower_bound))
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_lower_bound_keeps_a_memory_that_the_unbounded_gate_forgets():
  q, _, v, _, state = make_inputs(5, seq=9)
  z = jnp.full((BATCH, 9, KV_HEADS, KEY_DIM), -30.0)  # sigmoid(z) ~ 1e-13: forget everything
  groups = HEADS // KV_HEADS
  # Bound 0: f ~ 0, so each token reads only its own key and input: (scale q_t) . 1 v_t.
  one_token = jnp.einsum("bthd,bthe->bthe", q * KEY_DIM**-0.5, jnp.repeat(v, groups, axis=2))
  out, _ = op("xla", chunk_size=4)(q, z, v, jnp.float32(0.0), state)
  assert_close(out[:, 1:], one_token[:, 1:], TOL_EXACT_F32, "bound 0 forgets")
  bound = jnp.full((KV_HEADS, KEY_DIM), 0.95, jnp.float32)
  bounded, _ = op("xla", chunk_size=4)(q, z, v, bound, state)
  assert_close(bounded, paper_hgrn2(q, z, v, bound, state)[0], TOL_BLOCKED_F32, "bound 0.95")
  assert np.linalg.norm(bounded - one_token) > 0.5 * np.linalg.norm(one_token)


def test_long_sequence_with_strong_decay_stays_finite_and_exact():
  seq = 4097
  rng = np.random.default_rng(6)
  q, v = (jnp.asarray(rng.standard_normal((1, seq, 1, 4)), jnp.float32) for _ in range(2))
  # Logits down to about -100 with bound 0: per-token decays down to the float32 floor.
  z = jnp.asarray(-np.abs(rng.standard_normal((1, seq, 1, 4))) * 30.0, jnp.float32)

  def run(impl, q, z, v):
    k = hgrn2.hgrn2_keys(z)
    return hgrn2_attention(
      q, k, v, forget_logits=z, return_final_state=True, chunk_size=64, impl=impl
    )

  out, final = jax.jit(functools.partial(run, "xla"))(q, z, v)
  ref_out, ref_final = jax.jit(functools.partial(run, "reference"))(q, z, v)
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(final))
  assert_close(out, ref_out, TOL_BLOCKED_F32, "outputs")
  assert_close(final, ref_final, TOL_BLOCKED_F32, "final_state")
  grads = jax.grad(lambda q, z, v: jnp.sum(run("xla", q, z, v)[0] ** 2), argnums=(0, 1, 2))(q, z, v)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_bad_inputs_raise_value_errors_naming_the_argument():
  q, z, v, lower_bound, _ = make_inputs(7, seq=6)
  k = hgrn2.hgrn2_keys(z, lower_bound)
  with pytest.raises(ValueError, match=r"forget_logits must be .*\(2, 6, 2, 12\).*\(2, 6, 4, 12\)"):
    hgrn2_attention(q, k, v, forget_logits=jnp.zeros((2, 6, 4, 12)))
  with pytest.raises(ValueError, match=r"forget_logits must be .*got shape \(2, 6, 12\)"):
    hgrn2.hgrn2_keys(z[:, :, 0])
  with pytest.raises(ValueError, match=r"lower_bound must be .*\(2, 12\).*got shape \(4, 12\)"):
    hgrn2_attention(q, k, v, forget_logits=z, lower_bound=jnp.zeros((4, 12)))
  with pytest.raises(ValueError, match=r"lower_bound must lie in \[0, 1\), got lower_bound=1.5"):
    hgrn2_attention(q, k, v, forget_logits=z, lower_bound=1.5)
  with pytest.raises(ValueError, match="do not pass one"):
    hgrn2.hgrn2_keywords({"forget_logits": z, "log_decay": jnp.zeros(4)}, HEADS)
  with pytest.raises(ValueError, match="needs forget_logits"):
    hgrn2.hgrn2_keywords({}, HEADS)
  with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple"):
    hgrn2.hgrn2_keywords({"forget_logits": z}, 3)
  with pytest.raises(ValueError, match="k must be"):
    hgrn2_attention(q, k[..., :5], v, forget_logits=z[..., :5])
  with pytest.raises(TypeError, match="forget_logits"):
    registry.get("hgrn2")(q, k, v)
