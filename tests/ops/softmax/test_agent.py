"""Agent attention against its two softmax steps through pooled queries, written densely."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops import agent_attention
from attnjax.ops.softmax import agent
from tests.helpers import TOL_BLOCKED_F32, TOL_EXACT_F32, assert_close, assert_matches_reference


def qkv(seed, *, seq, heads=4, kv_heads=2, head_dim=8, value_dim=6):
  rng = np.random.default_rng(seed)
  shapes = [(2, seq, heads, head_dim), (2, seq, kv_heads, head_dim), (2, seq, kv_heads, value_dim)]
  return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)


def test_pooling_is_adaptive_average_pooling():
  seq, num_agents = 10, 4  # spans [0, 3), [2, 5), [5, 8), [7, 10): neighbours overlap
  pool = agent.pooling_matrix(seq, num_agents)
  for a in range(num_agents):
    start, end = math.floor(a * seq / num_agents), math.ceil((a + 1) * seq / num_agents)
    expected = np.zeros(seq)
    expected[start:end] = 1 / (end - start)
    np.testing.assert_allclose(pool[a], expected, rtol=1e-6)
  np.testing.assert_allclose(agent.pooling_matrix(20, 4), np.repeat(np.eye(4), 5, 1) / 5)
  with pytest.raises(ValueError, match="num_agents"):
    agent.pooling_matrix(10, 0)


@pytest.mark.parametrize("seq", [20, 23])
def test_agent_attention_is_softmax_through_pooled_queries(seq):
  q, k, v = qkv(0, seq=seq)
  out = agent_attention(q, k, v, num_agents=4, impl="reference")
  agents = jnp.einsum("nt,bthd->bnhd", agent.pooling_matrix(seq, 4), q)
  k_rep, v_rep = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
  scale = 8**-0.5
  aggregation = jax.nn.softmax(jnp.einsum("bnhd,bthd->bhnt", agents, k_rep) * scale, -1)
  agent_values = jnp.einsum("bhnt,bthv->bnhv", aggregation, v_rep)
  broadcast = jax.nn.softmax(jnp.einsum("bthd,bnhd->bhtn", q, agents) * scale, -1)
  expected = jnp.einsum("bhtn,bnhv->bthv", broadcast, agent_values)
  assert_close(out, expected, TOL_EXACT_F32, "agent")


def test_xla_matches_reference_with_gradients():
  q, k, v = qkv(1, seq=21)
  assert_matches_reference(
    functools.partial(agent_attention, num_agents=5, impl="xla"),
    functools.partial(agent_attention, num_agents=5, impl="reference"),
    (q, k, v),
    {},
    TOL_BLOCKED_F32,
    "agent xla",
  )


def test_more_agents_than_tokens_use_one_agent_per_token():
  q, k, v = qkv(2, seq=3)
  assert_close(
    agent_attention(q, k, v, num_agents=16, impl="reference"),
    agent_attention(q, k, v, num_agents=3, impl="reference"),
    TOL_EXACT_F32,
    "num_agents > seq",
  )
