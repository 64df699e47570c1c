"""Linear-family variants: registration, decay schedules, and each op against an oracle."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import registry
from attnjax.ops import linear_attention
from attnjax.ops.linear import agent, decay, flowformer, lightnet, variants
from tests.helpers import TOL_BLOCKED_F32, TOL_EXACT_F32, assert_close

LINEAR_VARIANTS = [n for n in registry.names() if registry.get(n).family == "linear"]


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


@pytest.mark.parametrize("name", LINEAR_VARIANTS)
def test_registered_with_paper_and_mixer(name):
  variant = registry.get(name)
  assert variant.family == "linear" and variant.paper
  assert registry.mixer_class(name).__name__ == "LinearAttention"
  q, k, v = qkv(0, seq=9)
  out, fast, ref = jax.jit(
    lambda *a: (variant(*a), variant.impls["xla"](*a), variant.reference(*a))
  )(q, k, v)
  assert out.shape == (2, 9, 4, 6) and np.all(np.isfinite(out))
  assert_close(fast, ref, TOL_BLOCKED_F32, name)


def test_decay_schedules():
  np.testing.assert_allclose(decay.alibi_slopes(8), 2.0 ** -np.arange(1, 9), rtol=1e-6)
  assert decay.alibi_slopes(6).shape == (6,) and np.all(np.diff(decay.alibi_slopes(4)) < 0)
  np.testing.assert_allclose(
    np.exp(decay.retention_log_decay(3)), [1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128]
  )
  first, last = decay.lightning_log_decay(4, 0, 3), decay.lightning_log_decay(4, 2, 3)
  assert np.all(first < last) and np.all(last <= 0)
  with pytest.raises(ValueError, match="layer must be"):
    decay.lightning_log_decay(4, 3, 3)


def test_retention_is_linear_attention_with_its_schedule():
  q, k, v = qkv(1)
  expected = linear_attention(q, k, v, log_decay=jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(4)))))
  assert_close(variants.retention(q, k, v), expected, TOL_EXACT_F32, "retention")


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

  def loss(impl, q, k, v):
    return jnp.sum(jnp.sin(run(q, k, v, impl=impl)))

  assert_close(run(q, k, v, impl="xla"), run(q, k, v, impl="reference"), TOL_BLOCKED_F32, "out")
  grads = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(q, k, v)
  ref_grads = jax.grad(functools.partial(loss, "reference"), argnums=(0, 1, 2))(q, k, v)
  for grad, ref_grad in zip(grads, ref_grads, strict=True):
    assert_close(grad, ref_grad, 2 * TOL_BLOCKED_F32, "grad")


def test_flowformer_bidirectional_matches_dense_flow_formula():
  q, k, v = qkv(4, heads=2, kv_heads=2)
  out = flowformer.flow_attention(q, k, v, causal=False, impl="reference")
  fq, fk = jax.nn.sigmoid(q), jax.nn.sigmoid(k)
  incoming = jnp.einsum("bthf,bhf->bth", fq, fk.mean(1))
  outgoing = jnp.einsum("bthf,bhf->bth", fk, fq.mean(1))
  conserved_in = jnp.einsum("bthf,bhf->bth", fq, (fk / outgoing[..., None]).mean(1))
  conserved_out = jnp.einsum("bthf,bhf->bth", fk, (fq / incoming[..., None]).mean(1))
  competition = jax.nn.softmax(jnp.clip(conserved_out, -1, 1), axis=1) * q.shape[1]
  scores = jnp.einsum("bihf,bjhf->bhij", fq, fk)
  scores = scores / scores.sum(-1, keepdims=True)
  expected = jnp.einsum("bhij,bjhv->bihv", scores, v * competition[..., None])
  expected = expected * jax.nn.sigmoid(conserved_in)[..., None]
  assert_close(out, expected, 1e-5, "flowformer")


def test_agent_attention_matches_dense_softmax_through_agents():
  q, k, v = qkv(5, seq=20, heads=2, kv_heads=1)
  out = agent.agent_attention(q, k, v, num_agents=4, impl="xla")
  agents = q.reshape(2, 4, 5, 2, 8).mean(axis=2)  # 4 spans of 5 tokens
  k_rep, v_rep = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
  agent_probs = jax.nn.softmax(jnp.einsum("bnhd,bthd->bhnt", agents, k_rep) * 8**-0.5, -1)
  agent_values = jnp.einsum("bhnt,bthv->bnhv", agent_probs, v_rep)
  probs = jax.nn.softmax(jnp.einsum("bthd,bnhd->bhtn", q, agents) * 8**-0.5, -1)
  expected = jnp.einsum("bhtn,bnhv->bthv", probs, agent_values)
  assert_close(out, expected, TOL_BLOCKED_F32, "agent")
  with pytest.raises(ValueError, match="num_agents"):
    agent.pooling_matrix(10, 0)
