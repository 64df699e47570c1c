"""Linear-family variants and the gated layers' output functions against oracles written from
the papers' equations (dense quadratic forms, explicit per-head loops)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import registry
from attnjax.ops import gla_attention, linear_attention
from attnjax.ops.linear import decay, flowformer, gates, gla, lightnet, variants
from tests.helpers import TOL_BLOCKED_F32, TOL_EXACT_F32, assert_close, assert_matches_reference


def qkv(seed, batch=2, seq=23, heads=4, kv_heads=2, head_dim=8, value_dim=6):
  rng = np.random.default_rng(seed)
  return tuple(
    jnp.asarray(rng.standard_normal(shape), jnp.float32)
    for shape in [
      (batch, seq, heads, head_dim),
      (batch, seq, kv_heads, head_dim),
      (batch, seq, kv_heads, value_dim),
    ]
  )


def dense_decayed(q, k, v, log_decay):
  """`o_t = sum_{s <= t} sum_f q_tf k_sf prod_{s < r <= t} a_rf v_s`, GQA by repeat.

  `log_decay [b, t, h, f]`; q already scaled and feature-mapped.
  """
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  seq = q.shape[1]
  cum = jnp.cumsum(log_decay, axis=1)
  causal = jnp.tril(jnp.ones((seq, seq), bool))[None, :, :, None, None]
  weight = jnp.where(causal, jnp.exp(cum[:, :, None] - cum[:, None, :]), 0.0)  # [b, t, s, h, f]
  return jnp.einsum("bthf,bshf,btshf,bshv->bthv", q, k, weight, v)


def test_variants_declare_their_mixers():
  for name in ("linear", "lightning", "retention", "gla", "based", "lightnet", "flowformer"):
    variant = registry.get(name)
    assert variant.family == "linear" and variant.paper
    assert variant.module.startswith("attnjax.nn.linear:")


def test_decay_schedules():
  np.testing.assert_allclose(decay.alibi_slopes(8), 2.0 ** -np.arange(1, 9), rtol=1e-6)
  assert decay.alibi_slopes(6).shape == (6,) and np.all(np.diff(decay.alibi_slopes(4)) < 0)
  np.testing.assert_allclose(
    np.exp(decay.retention_log_decay(3)), [1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128]
  )
  # TransNormerLLM: lambda_h = exp(-2^(-8h/H) (1 - l / (L - 1) + 1e-5)), h = 1..H.
  heads, layer, num_layers = 4, 1, 3
  expected = -(2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)) * (1 - 1 / 2 + 1e-5)
  np.testing.assert_allclose(decay.lightning_log_decay(heads, layer, num_layers), expected, 1e-6)
  first, last = decay.lightning_log_decay(4, 0, 3), decay.lightning_log_decay(4, 2, 3)
  assert np.all(first < last) and np.all(last <= 0)
  with pytest.raises(ValueError, match="layer must be"):
    decay.lightning_log_decay(4, 3, 3)


def test_retention_is_the_papers_decayed_sum():
  q, k, v = qkv(1, seq=19)
  gamma = 1 - 2.0 ** (-5.0 - np.arange(4))
  seq = q.shape[1]
  distance = np.arange(seq)[:, None] - np.arange(seq)[None, :]
  decay_nm = np.where(distance >= 0, gamma[:, None, None] ** np.maximum(distance, 0), 0.0)
  scores = jnp.einsum("bnhd,bmhd->bhnm", q, jnp.repeat(k, 2, axis=2)) * 8**-0.5
  expected = jnp.einsum("bhnm,bmhv->bnhv", scores * decay_nm, jnp.repeat(v, 2, axis=2))
  assert_close(variants.retention(q, k, v, impl="reference"), expected, TOL_EXACT_F32, "retention")


def test_lightning_is_swish_features_with_its_decay_and_no_scale():
  q, k, v = qkv(2, seq=17)
  layer, num_layers = 2, 4
  log_decay = decay.lightning_log_decay(4, layer, num_layers)
  expected = dense_decayed(
    jax.nn.silu(q), jax.nn.silu(k), v, jnp.broadcast_to(log_decay[:, None], (2, 17, 4, 8))
  )
  out = variants.lightning_attention(q, k, v, layer=layer, num_layers=num_layers, impl="xla")
  assert_close(out, expected, TOL_BLOCKED_F32, "lightning")
  registered = registry.get("lightning")(q, k, v, layer=layer, num_layers=num_layers)
  assert_close(registered, expected, TOL_BLOCKED_F32, "registered lightning")


def test_gla_decay_is_sigmoid_to_the_inverse_temperature():
  gate_logits = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 3, 4)) * 3)
  alpha = (1 / (1 + np.exp(-np.asarray(gate_logits, np.float64)))) ** (1 / 16)
  np.testing.assert_allclose(np.exp(gla.gla_log_decay(gate_logits)), alpha, rtol=1e-6)
  np.testing.assert_allclose(
    np.exp(gla.gla_log_decay(gate_logits, temperature=2.0)), alpha**8, rtol=1e-5
  )
  with pytest.raises(ValueError, match="temperature"):
    gla.gla_log_decay(gate_logits, temperature=0.0)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_gla_attention_is_the_papers_gated_recurrence(impl):
  q, k, v = qkv(4, seq=21)
  gate_logits = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape) * 2, jnp.float32)
  alpha = jax.nn.sigmoid(gate_logits) ** (1 / 16)
  expected = dense_decayed(q * 8**-0.5, k, v, jnp.log(alpha))
  out = gla_attention(q, k, v, gate_logits=gate_logits, impl=impl, chunk_size=8)
  assert_close(out, expected, TOL_BLOCKED_F32, f"gla {impl}")
  registered = registry.get("gla")(q, k, v, gate_logits=gate_logits, impl=impl)
  assert_close(registered, expected, TOL_BLOCKED_F32, "registered gla")


def test_gla_rejects_bad_gates():
  q, k, v = qkv(6, seq=5)
  with pytest.raises(ValueError, match="gate_logits must be"):
    gla_attention(q, k, v, gate_logits=jnp.ones((2, 5, 4)))
  with pytest.raises(ValueError, match="do not pass one"):
    gla.gla_keywords({"gate_logits": jnp.ones(q.shape), "log_decay": jnp.zeros(4)}, 4)
  with pytest.raises(TypeError, match="gate_logits"):
    registry.get("gla")(q, k, v)


def test_presets_give_the_linear_attention_call_of_each_variant():
  q, k, v = qkv(7, seq=13)
  gate_logits = jnp.asarray(np.random.default_rng(8).standard_normal(q.shape), jnp.float32)
  calls = {
    "lightning": {"layer": 1, "num_layers": 3},
    "retention": {},
    "gla": {"gate_logits": gate_logits, "temperature": 4.0},
    "linear": {},
    "based": {},
  }
  for name, kwargs in calls.items():
    variant = registry.get(name)
    base = variant.preset({**variant.defaults, **kwargs, "impl": "reference"}, q.shape[2])
    want = variant(q, k, v, impl="reference", **kwargs)
    assert_close(linear_attention(q, k, v, **base), want, TOL_EXACT_F32, name)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_lightnet_equals_additive_recurrence(impl):
  q, k, v = qkv(2)
  out = lightnet.lightnet_attention(q, k, v, impl=impl, chunk_size=8)
  # o_t = scale q_t . sum_{s <= t} exp(k_s) v_s / sum_{s <= t} exp(k_s), per key channel.
  k_rep, v_rep = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
  seq = q.shape[1]
  causal = jnp.tril(jnp.ones((seq, seq), bool))[None, :, :, None, None]
  weight = jnp.where(causal, jnp.exp(k_rep)[:, None], 0.0)  # [b, t, s, h, f]
  weight = weight / weight.sum(axis=2, keepdims=True)
  expected = jnp.einsum("bthf,btshf,bshv->bthv", q * 8**-0.5, weight, v_rep)
  assert_close(out, expected, TOL_BLOCKED_F32, "lightnet")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_flowformer_xla_matches_reference_with_gradients(causal):
  q, k, v = qkv(3)
  run = functools.partial(flowformer.flow_attention, causal=causal, chunk_size=8)
  assert_matches_reference(
    functools.partial(run, impl="xla"),
    functools.partial(run, impl="reference"),
    (q, k, v),
    {},
    TOL_BLOCKED_F32,
    "flowformer",
  )


def _flow_oracle(q, k, v, *, causal):
  """Flowformer by its equations with dense `[t, s]` visibility: means over visible tokens."""
  fq, fk = jax.nn.sigmoid(q), jax.nn.sigmoid(jnp.repeat(k, q.shape[2] // k.shape[2], axis=2))
  v = jnp.repeat(v, q.shape[2] // k.shape[2], axis=2)
  seq = q.shape[1]
  visible = np.tril(np.ones((seq, seq))) if causal else np.ones((seq, seq))
  mean_over = visible / visible.sum(-1, keepdims=True)  # row i: mean over visible j

  def mean(x):  # [b, t, h, ...] -> visible means at each position
    return jnp.einsum("ij,bjh...->bih...", mean_over, x)

  incoming = jnp.einsum("bthf,bthf->bth", fq, mean(fk)) + 1e-6
  outgoing = jnp.einsum("bthf,bthf->bth", fk, mean(fq)) + 1e-6
  conserved_in = jnp.einsum("bthf,bthf->bth", fq, mean(fk / outgoing[..., None]))
  conserved_out = jnp.einsum("bthf,bthf->bth", fk, mean(fq / incoming[..., None]))
  if causal:
    conserved_out = jnp.clip(conserved_out, -1, 1)
  competition = jnp.exp(conserved_out) / mean(jnp.exp(conserved_out))
  scores = jnp.einsum("bihf,bjhf->bhij", fq, fk) * visible
  scores = scores / scores.sum(-1, keepdims=True)
  out = jnp.einsum("bhij,bjhv->bihv", scores, v * competition[..., None])
  return out * jax.nn.sigmoid(conserved_in)[..., None]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_flowformer_matches_its_flow_equations(causal):
  q, k, v = qkv(4, seq=19)
  out = flowformer.flow_attention(q, k, v, causal=causal, impl="reference")
  assert_close(out, _flow_oracle(q, k, v, causal=causal), 1e-5, "flowformer")


def test_flowformer_bidirectional_competition_is_softmax_over_keys_times_their_count():
  q, k, v = qkv(5, seq=11, heads=2, kv_heads=2)
  fq, fk = jax.nn.sigmoid(q), jax.nn.sigmoid(k)
  # The paper's sums: O^_j = phi(k_j) sum_i phi(q_i) / I_i, I_i = phi(q_i) sum_j phi(k_j).
  incoming = jnp.einsum("bthf,bhf->bth", fq, fk.sum(1))
  conserved_out = jnp.einsum("bthf,bhf->bth", fk, (fq / incoming[..., None]).sum(1))
  outgoing = jnp.einsum("bthf,bhf->bth", fk, fq.sum(1))
  conserved_in = jnp.einsum("bthf,bhf->bth", fq, (fk / outgoing[..., None]).sum(1))
  competition = jax.nn.softmax(conserved_out, axis=1) * q.shape[1]
  scores = jnp.einsum("bihf,bjhf->bhij", fq, fk)
  scores = scores / scores.sum(-1, keepdims=True)
  expected = jnp.einsum("bhij,bjhv->bihv", scores, v * competition[..., None])
  expected = expected * jax.nn.sigmoid(conserved_in)[..., None]
  out = flowformer.flow_attention(q, k, v, causal=False, impl="reference")
  assert_close(out, expected, 1e-5, "flowformer with the paper's sums")


def _output(seed, shape=(2, 7, 3, 5)):
  rng = np.random.default_rng(seed)
  o = jnp.asarray(rng.standard_normal(shape) * 3 + 1.5, jnp.float32)
  gate = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return o, gate


def test_group_norm_is_layer_norm_of_each_head():
  o, gate = _output(9)
  x = np.asarray(o, np.float64)
  expected = np.empty_like(x)
  for h in range(x.shape[2]):  # GroupNorm_h: one group per head, no affine
    head = x[:, :, h]
    mean, var = head.mean(-1, keepdims=True), head.var(-1, keepdims=True)
    expected[:, :, h] = (head - mean) / np.sqrt(var + gates.GROUP_NORM_EPS)
  assert_close(gates.group_norm(o), expected, TOL_EXACT_F32, "group_norm")
  swish = np.asarray(gate) / (1 + np.exp(-np.asarray(gate, np.float64)))
  assert_close(gates.group_norm_swish_gate(o, gate), swish * expected, TOL_EXACT_F32, "gated")


def test_srms_norm_normalizes_all_heads_of_a_token_together():
  o, gate = _output(10)
  x = np.asarray(o, np.float64)
  flat = x.reshape(*x.shape[:2], -1)
  rms = np.sqrt((flat**2).mean(-1) + gates.SRMS_NORM_EPS)[..., None, None]
  assert_close(gates.srms_norm(o), x / rms, TOL_EXACT_F32, "srms_norm")
  assert_close(gates.srms_norm_gate(o, gate), x / rms * np.asarray(gate), TOL_EXACT_F32, "gate")


def test_gates_reject_mismatched_shapes():
  o, gate = _output(11)
  with pytest.raises(ValueError, match="gate_logits"):
    gates.group_norm_swish_gate(o, gate[..., :2])
  with pytest.raises(ValueError, match="gate"):
    gates.srms_norm_gate(o[0], gate[0])
