"""LightNet and Flowformer carry a state: pieces and token-by-token decoding equal one call."""

import functools

import jax
import jax.numpy as jnp
import pytest

from attnjax import registry
from attnjax.ops.linear import flowformer, lightnet
from tests.helpers import TOL_BLOCKED_F32, assert_close, assert_matches_reference, random_normal

SHAPE = dict(batch=2, seq=23, heads=4, kv_heads=2, head_dim=6, value_dim=5)


def _qkv(seed):
  b, t, h, hk, d, dv = SHAPE.values()
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (
    random_normal(kq, (b, t, h, d)),
    2.0 * random_normal(kk, (b, t, hk, d)),  # large keys: LightNet's log-space path matters
    random_normal(kv, (b, t, hk, dv)),
  )


VARIANTS = {
  "lightnet": lightnet.lightnet_attention,
  "flowformer": flowformer.flow_attention,
}


def _leaves_close(x, ref, what):
  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(ref), strict=True):
    assert_close(a, b, TOL_BLOCKED_F32, what)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_token_by_token_decoding_equals_one_call(name):
  op, step = VARIANTS[name], registry.get(name).step
  q, k, v = _qkv(0)
  full, final = op(q, k, v, impl="reference", return_final_state=True)
  step = jax.jit(step)
  out, state = step(q[:, 0], k[:, 0], v[:, 0], None)
  outs = [out]
  for t in range(1, q.shape[1]):
    out, state = step(q[:, t], k[:, t], v[:, t], state)
    outs.append(out)
  assert_close(jnp.stack(outs, axis=1), full, TOL_BLOCKED_F32, f"{name} decoded")
  _leaves_close(state, final, f"{name} final state")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_two_pieces_with_passed_state_equal_one_call_values_and_gradients(name):
  op = VARIANTS[name]
  cut = 9

  def two_pieces(q, k, v):
    first, state = op(
      q[:, :cut], k[:, :cut], v[:, :cut], impl="xla", chunk_size=4, return_final_state=True
    )
    second = op(q[:, cut:], k[:, cut:], v[:, cut:], impl="xla", chunk_size=4, initial_state=state)
    return jnp.concatenate([first, second], axis=1)

  assert_matches_reference(
    two_pieces,
    functools.partial(op, impl="reference"),
    _qkv(1),
    {},
    TOL_BLOCKED_F32,
    f"{name} in two pieces",
  )


def test_lightnet_equals_its_additive_definition_with_an_initial_state():
  q, k, v = _qkv(3)
  b, t, h, hk, d, dv = SHAPE.values()
  groups = h // hk
  prior_keys = 2.0 * random_normal(jax.random.key(4), (b, 3, hk, d))
  prior_values = random_normal(jax.random.key(5), (b, 3, hk, dv))
  _, state = lightnet.lightnet_attention(
    q[:, :3], prior_keys, prior_values, impl="reference", return_final_state=True
  )
  keys = jnp.repeat(jnp.exp(jnp.concatenate([prior_keys, k], 1)), groups, axis=2)
  values = jnp.repeat(jnp.concatenate([prior_values, v], 1), groups, axis=2)
  s = jnp.cumsum(jnp.einsum("bthd,bthe->bthde", keys, values), axis=1)
  z = jnp.cumsum(keys, axis=1)
  want = jnp.einsum("bthd,bthde->bthe", q * d**-0.5, (s / z[..., None])[:, 3:])
  got = lightnet.lightnet_attention(q, k, v, impl="xla", chunk_size=8, initial_state=state)
  assert_close(got, want, TOL_BLOCKED_F32, "lightnet vs S_t / z_t")


def test_bad_states_raise():
  q, k, v = _qkv(6)
  with pytest.raises(ValueError, match="initial_state must be"):
    lightnet.lightnet_attention(q, k, v, initial_state=jnp.zeros((2, 4, 6, 5)))
  state = flowformer.FlowState.zeros(2, 4, 6, 4)
  with pytest.raises(ValueError, match="initial_state.linear must be"):
    flowformer.flow_attention(q, k, v, initial_state=state)
  with pytest.raises(ValueError, match="only when causal"):
    flowformer.flow_attention(q, k, v, causal=False, return_final_state=True)
  with pytest.raises(ValueError, match="one token"):
    registry.get("lightnet").step(q, k[:, 0], v[:, 0], None)
