"""The delta rule (DeltaNet, Gated DeltaNet): the reference against the papers' recurrence, the
chunked form against the reference (values, final states, gradients), document restarts,
decoding, pieces, long sequences and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import registry
from attnjax.ops.delta import api, conv, gated
from tests.helpers import (
  TOL_BF16,
  TOL_BLOCKED_F32,
  TOL_EXACT_F32,
  assert_close,
  assert_matches_reference,
  random_normal,
)


def _inputs(seed, *, batch=2, seq=37, heads=4, kv_heads=2, key_dim=12, value_dim=10,
            gated_decay=True, dtype=jnp.float32):  # fmt: skip
  keys = jax.random.split(jax.random.key(seed), 6)
  q = random_normal(keys[0], (batch, seq, heads, key_dim), dtype)
  k = random_normal(keys[1], (batch, seq, kv_heads, key_dim))
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
  v = random_normal(keys[2], (batch, seq, kv_heads, value_dim), dtype)
  beta = jax.nn.sigmoid(random_normal(keys[3], (batch, seq, heads)))
  kwargs = {"initial_state": random_normal(keys[5], (batch, heads, key_dim, value_dim))}
  if gated_decay:
    kwargs["log_decay"] = jax.nn.log_sigmoid(1.5 + random_normal(keys[4], (batch, seq, heads)))
  return (q, k, v, beta), kwargs


def _paper_recurrence(q, k, v, beta, log_decay, initial_state, scale):
  """Gated DeltaNet's Eq. 10 as written, with the transposed state `[value_dim, key_dim]`:
  `S_t = S_{t-1} a_t (I - beta_t k_t k_t^T) + beta_t v_t k_t^T`, `o_t = scale S_t q_t`."""
  q, k, v, beta, log_decay, state = (
    np.asarray(x, np.float64) for x in (q, k, v, beta, log_decay, initial_state)
  )
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  state = np.swapaxes(state, -1, -2).copy()
  out = np.zeros((*q.shape[:3], v.shape[-1]))
  eye = np.eye(q.shape[-1])
  for b in range(q.shape[0]):
    for h in range(q.shape[2]):
      s = state[b, h]
      for t in range(q.shape[1]):
        kt = k[b, t, h][:, None]
        s = s @ (np.exp(log_decay[b, t, h]) * (eye - beta[b, t, h] * kt @ kt.T))
        s = s + beta[b, t, h] * v[b, t, h][:, None] @ kt.T
        out[b, t, h] = scale * s @ q[b, t, h]
      state[b, h] = s
  return out, np.swapaxes(state, -1, -2)


def test_reference_is_the_papers_recurrence():
  (q, k, v, beta), kwargs = _inputs(0, seq=13)
  out, state = api.delta_rule_attention(
    q, k, v, beta, scale=0.3, impl="reference", return_final_state=True, **kwargs
  )
  want_out, want_state = _paper_recurrence(
    q, k, v, beta, kwargs["log_decay"], kwargs["initial_state"], 0.3
  )
  assert_close(out, want_out, TOL_EXACT_F32, "out")
  assert_close(state, want_state, TOL_EXACT_F32, "final state")


@pytest.mark.parametrize("gated_decay", [False, True], ids=["deltanet", "gated"])
@pytest.mark.parametrize(
  "sizes, chunk_size",
  [
    (dict(seq=37, heads=4, kv_heads=2), 8),  # GQA, length not divisible by the chunk
    (dict(seq=50, heads=3, kv_heads=1, key_dim=60, value_dim=7), 16),  # MQA, head_dim 60
    (dict(seq=5, heads=2, kv_heads=2), 64),  # shorter than one chunk
  ],
  ids=["gqa_37", "mqa_hd60", "short"],
)
def test_chunked_equals_reference_values_states_and_gradients(gated_decay, sizes, chunk_size):
  args, kwargs = _inputs(1, gated_decay=gated_decay, **sizes)

  def run(impl):
    def op(q, k, v, beta, **kw):
      return api.delta_rule_attention(
        q, k, v, beta, impl=impl, chunk_size=chunk_size, return_final_state=True, **kw
      )

    return op

  assert_matches_reference(run("xla"), run("reference"), args, kwargs, TOL_BLOCKED_F32, "xla")


def test_bfloat16_inputs_match_the_float32_reference():
  args, kwargs = _inputs(2, dtype=jnp.bfloat16)

  def op(impl):
    return lambda *a, **kw: api.delta_rule_attention(*a, impl=impl, chunk_size=16, **kw)

  assert_matches_reference(op("xla"), op("reference"), args, kwargs, TOL_BF16, "bf16 xla")


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_segment_ids_restart_the_state_at_each_document(impl):
  """Packed documents equal separate calls: the first continues `initial_state`, the others
  start from zeros; the final state is the last document's."""
  (q, k, v, beta), kwargs = _inputs(3, batch=1, seq=40)
  bounds = [0, 11, 12, 29, 40]  # a one-token document included
  ids = jnp.asarray(np.repeat(np.arange(4), np.diff(bounds)))[None]
  packed, packed_state = api.delta_rule_attention(
    q, k, v, beta, impl=impl, chunk_size=8, segment_ids=ids, return_final_state=True, **kwargs
  )
  state = kwargs["initial_state"]
  for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
    piece = [x[:, lo:hi] for x in (q, k, v, beta)]
    out, state = api.delta_rule_attention(
      *piece,
      log_decay=kwargs["log_decay"][:, lo:hi],
      initial_state=state if n == 0 else jnp.zeros_like(state),
      impl="reference",
      return_final_state=True,
    )
    assert_close(packed[:, lo:hi], out, TOL_BLOCKED_F32, f"document {n}")
  assert_close(packed_state, state, TOL_BLOCKED_F32, "final state")


def test_segment_ids_gradients_of_chunked_equal_reference():
  args, kwargs = _inputs(4, seq=29)
  ids = jnp.asarray(np.repeat([[0, 1, 2]], [9, 7, 13], axis=1))
  ids = jnp.concatenate([ids, ids[:, ::-1]], axis=0)

  def op(impl):
    return lambda *a, **kw: api.delta_rule_attention(
      *a, impl=impl, chunk_size=8, segment_ids=ids, return_final_state=True, **kw
    )

  assert_matches_reference(op("xla"), op("reference"), args, kwargs, TOL_BLOCKED_F32, "segments")


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_token_by_token_decoding_equals_one_call(name):
  (q, k, v, beta), kwargs = _inputs(5, seq=17, gated_decay=name == "gated_deltanet")
  kwargs.pop("initial_state")
  variant = registry.get(name)
  full, final = variant(
    q, k, v, beta=beta, impl="xla", chunk_size=4, return_final_state=True, **kwargs
  )
  state, outs = None, []
  for t in range(q.shape[1]):
    per_token = {n: x[:, t : t + 1] for n, x in kwargs.items()}
    out, state = variant.step(
      q[:, t], k[:, t], v[:, t], state, beta=beta[:, t : t + 1], **per_token
    )
    outs.append(out)
  assert_close(jnp.stack(outs, axis=1), full, TOL_BLOCKED_F32, "variant.step")
  assert_close(state, final, TOL_BLOCKED_F32, "final state")
  decay_t = kwargs.get("log_decay", None)
  out, _ = api.delta_rule_step(
    q[:, 0], k[:, 0], v[:, 0], beta[:, 0], jnp.zeros_like(final),
    log_decay_t=None if decay_t is None else decay_t[:, 0],
  )  # fmt: skip
  assert_close(out, full[:, 0], TOL_BLOCKED_F32, "delta_rule_step")


def test_two_pieces_with_passed_state_equal_one_call_values_and_gradients():
  args, kwargs = _inputs(6, seq=30)
  cut = 13

  def pieces(q, k, v, beta, log_decay, initial_state):
    first, state = api.delta_rule_attention(
      q[:, :cut], k[:, :cut], v[:, :cut], beta[:, :cut], log_decay=log_decay[:, :cut],
      initial_state=initial_state, impl="xla", chunk_size=8, return_final_state=True,
    )  # fmt: skip
    second = api.delta_rule_attention(
      q[:, cut:], k[:, cut:], v[:, cut:], beta[:, cut:], log_decay=log_decay[:, cut:],
      initial_state=state, impl="xla", chunk_size=8,
    )  # fmt: skip
    return jnp.concatenate([first, second], axis=1)

  def whole(q, k, v, beta, log_decay, initial_state):
    return api.delta_rule_attention(
      q, k, v, beta, log_decay=log_decay, initial_state=initial_state, impl="reference"
    )

  assert_matches_reference(pieces, whole, args, kwargs, TOL_BLOCKED_F32, "two pieces")


def test_long_sequence_with_strong_decay_stays_finite():
  (q, k, v, beta), kwargs = _inputs(7, batch=1, seq=65536, heads=1, kv_heads=1, key_dim=8,
                                    value_dim=8)  # fmt: skip
  log_decay = jnp.full_like(kwargs["log_decay"], -30.0)

  def loss(q, k, v, beta):
    out = api.delta_rule_attention(q, k, v, beta, log_decay=log_decay, impl="xla")
    return jnp.sum(out * out), out

  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, beta)
  assert np.isfinite(np.asarray(out)).all()
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  # With a_t ~ 0 every token sees only itself: o_t = scale * beta_t (q_t . k_t) v_t.
  expected = 8**-0.5 * beta[..., None] * jnp.sum(q * k, -1, keepdims=True) * v
  assert_close(out, expected, TOL_BLOCKED_F32, "memoryless limit")


def test_short_convolution_reads_only_its_document():
  x = random_normal(jax.random.key(8), (2, 11, 3))
  weight = random_normal(jax.random.key(9), (4, 3))
  ids = np.repeat([[0, 1]], [5, 6], axis=1).repeat(2, axis=0)
  ids[1] = np.repeat([0, 1, 2], [2, 2, 7])
  want = np.zeros(x.shape)
  for b in range(2):
    for t in range(11):
      for lag in range(4):
        if t - lag >= 0 and ids[b, t - lag] == ids[b, t]:
          want[b, t] += np.asarray(weight[lag]) * np.asarray(x[b, t - lag])
  assert_close(conv.short_convolution(x, weight, jnp.asarray(ids)), want, TOL_EXACT_F32, "conv")


def test_gated_decay_is_mambas_and_negative():
  logits = random_normal(jax.random.key(10), (2, 5, 3))
  a_log = gated.init_a_log(jax.random.key(11), 3)
  dt_bias = gated.init_dt_bias(jax.random.key(12), 3)
  dt = np.asarray(jax.nn.softplus(dt_bias))  # the initial step size
  assert ((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 1e-1 * (1 + 1e-5))).all()
  assert (np.exp(np.asarray(a_log)) >= 1.0).all() and (np.exp(np.asarray(a_log)) <= 16.0).all()
  got = gated.gated_delta_log_decay(logits, a_log, dt_bias)
  want = -np.exp(np.asarray(a_log)) * np.log1p(np.exp(np.asarray(logits) + np.asarray(dt_bias)))
  assert_close(got, want, TOL_EXACT_F32, "log decay")
  assert (np.asarray(got) < 0).all()


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda a, kw: ((*a[:3], a[3][..., :1]), kw), "beta must be"),
    (lambda a, kw: (a, {**kw, "log_decay": kw["log_decay"][..., None]}), "log_decay must be"),
    (lambda a, kw: (a, {**kw, "initial_state": kw["initial_state"][:, :1]}), "initial_state"),
    (lambda a, kw: (a, {**kw, "segment_ids": jnp.zeros((2, 5), jnp.int32)}), "segment_ids"),
    (lambda a, kw: (a, {**kw, "segment_ids": jnp.zeros((2, 37))}), "segment_ids"),
    (lambda a, kw: (a, {**kw, "chunk_size": 0}), "chunk_size"),
    (lambda a, kw: ((a[0], a[1][:, :, :, :5], *a[2:]), kw), "k must be"),
  ],
  ids=[
    "beta",
    "log_decay",
    "initial_state",
    "segment_ids_shape",
    "segment_ids_dtype",
    "chunk_size",
    "k",
  ],  # fmt: skip
)
def test_bad_input_is_a_value_error_naming_the_argument(change, message):
  args, kwargs = change(*_inputs(13))
  with pytest.raises(ValueError, match=message):
    api.delta_rule_attention(*args, **kwargs)


def test_gated_op_needs_a_decay():
  (q, k, v, beta), _ = _inputs(14)
  with pytest.raises(ValueError, match="log_decay"):
    gated.gated_delta_rule_attention(q, k, v, beta, log_decay=None)


@pytest.mark.parametrize("size", [1, 9, 16])
def test_unit_lower_inverse_and_its_gradient_equal_a_dense_inverse(size):
  from attnjax.ops.delta import chunk

  keys = jax.random.split(jax.random.key(15), 2)
  a = jnp.tril(0.3 * random_normal(keys[0], (3, size, size)), -1)
  weights = random_normal(keys[1], (3, size, size))

  def dense(a):
    return jnp.linalg.inv(jnp.eye(size) + jnp.tril(a, -1))

  def loss(inverse):
    return lambda a: jnp.sum(inverse(a) * weights)

  assert_close(chunk.unit_lower_inverse(a), dense(a), TOL_EXACT_F32, "inverse")
  got, want = (jax.grad(loss(f))(a) for f in (chunk.unit_lower_inverse, dense))
  assert_close(got, jnp.tril(want, -1), TOL_EXACT_F32, "gradient")
