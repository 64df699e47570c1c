"""Softmax-variant mixers against hand-written compositions of projections + ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks, nn, registry
from attnjax.nn import softmax_variants
from attnjax.ops import (
  aaren,
  cca_attention,
  diffqkv_attention,
  disentangled_attention,
  dot_product_attention,
  gaussian_attention,
  moh_attention,
  moh_route,
  sink_attention,
)
from tests.helpers import TOL_BLOCKED_F32, TOL_EXACT_F32, assert_close, random_normal

EMBED, HEADS, KV_HEADS, HEAD_DIM = 24, 4, 2, 10


def _mixer(name, impl="reference", seed=0, **options):
  return registry.mixer_class(name)(
    EMBED, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, variant=name,
    rngs=nnx.Rngs(seed), impl=impl, **options,
  )  # fmt: skip


def _x(seed=7, t=13):
  return random_normal(jax.random.key(seed), (2, t, EMBED))


def _qkv(m, x):
  q, k, v = (jnp.einsum("btd,dhk->bthk", x, w[...]) for w in (m.q, m.k, m.v))
  positions = jnp.arange(x.shape[1])
  return nn.apply_rope(q, positions), nn.apply_rope(k, positions), v


def _out(m, heads):
  return jnp.einsum("bthk,hkd->btd", heads, m.out[...])


@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
def test_gated_mixer_gates_the_attention_output(gate):
  m, x = _mixer("gated", gate=gate), _x()
  q, k, v = _qkv(m, x)
  gate_values = jax.nn.sigmoid(jnp.einsum("btd,dhk->bthk", x, m.gate[...]))
  attention = dot_product_attention(q, k, v, mask=masks.causal(), impl="reference")
  assert m.gate.shape == (EMBED, HEADS, HEAD_DIM if gate == "elementwise" else 1)
  assert_close(m(x), _out(m, gate_values * attention), TOL_EXACT_F32, gate)


@pytest.mark.parametrize("num_sink_tokens", [0, 2])
def test_sink_mixer_passes_its_sink_parameters(num_sink_tokens):
  m, x = _mixer("sinks", num_sink_tokens=num_sink_tokens), _x()
  m.sinks[...] = random_normal(jax.random.key(3), (HEADS,))
  q, k, v = _qkv(m, x)
  tokens = {} if not num_sink_tokens else {"sink_k": m.sink_k[...], "sink_v": m.sink_v[...]}
  heads = sink_attention(q, k, v, sinks=m.sinks[...], mask=masks.causal(), **tokens)
  assert_close(m(x), _out(m, heads), TOL_EXACT_F32, f"{num_sink_tokens} sink tokens")


def test_moh_mixer_routes_heads_and_sows_its_balance_loss():
  m, x = _mixer("moh", num_shared_heads=1, top_k=2, aux_loss_weight=0.5), _x()
  q, k, v = _qkv(m, x)
  logits = [jnp.einsum("btd,dh->bth", x, w[...]) for w in (m.router_shared, m.router_routed)]
  balance = jnp.einsum("btd,dh->bth", x, m.router_balance[...])
  weights, loss = moh_route(*logits, balance, top_k=2)
  heads = moh_attention(q, k, v, weights, mask=masks.causal(), impl="reference")
  out, sown = nnx.capture(m, nnx.Intermediate)(x)
  assert_close(out, _out(m, heads), TOL_EXACT_F32, "moh")
  (aux,) = jax.tree.leaves(sown)
  assert_close(aux, 0.5 * loss, TOL_EXACT_F32, "aux loss")
  assert np.all((np.asarray(weights) > 0).sum(-1) == 3)  # 1 shared + top-2 of 3 routed


def test_aaren_mixer_is_one_learned_query_over_projected_keys():
  m, x = _mixer("aaren"), _x()
  k, v = (jnp.einsum("btd,dhk->bthk", x, w[...]) for w in (m.k, m.v))
  query = jnp.broadcast_to(m.query[...], (2, 1, HEADS, HEAD_DIM))
  heads = aaren(query, k, v, impl="reference")
  assert_close(m(x), _out(m, heads), TOL_EXACT_F32, "aaren")


def test_diffqkv_mixer_projects_fewer_k_heads_and_an_augmented_q():
  m, x = _mixer("diffqkv", num_k_heads=1, key_dim=6, q_aug_dim=16), _x()
  assert (m.q.shape, m.q_aug.shape) == ((EMBED, HEADS, 16), (HEADS, 16, 6))
  assert (m.k.shape, m.v.shape) == ((EMBED, 1, 6), (EMBED, KV_HEADS, HEAD_DIM))
  q = jnp.einsum("btd,dhe,hek->bthk", x, m.q[...], m.q_aug[...])
  k, v = (jnp.einsum("btd,dhk->bthk", x, w[...]) for w in (m.k, m.v))
  positions = jnp.arange(x.shape[1])
  q, k = nn.apply_rope(q, positions), nn.apply_rope(k, positions)
  heads = diffqkv_attention(q, k, v, mask=masks.causal(), impl="reference")
  assert_close(m(x), _out(m, heads), TOL_EXACT_F32, "diffqkv")


@pytest.mark.parametrize(
  "causal,share,max_distance", [(False, False, None), (True, False, 16), (False, True, None)]
)
def test_disentangled_mixer_projects_its_relative_embeddings(causal, share, max_distance):
  m = _mixer(
    "disentangled",
    num_buckets=8,
    max_distance=max_distance,
    share_position_projections=share,
    causal=causal,
  )
  x = _x()
  q, k, v = (jnp.einsum("btd,dhk->bthk", x, w[...]) for w in (m.q, m.k, m.v))  # no rotary
  assert (m.q_rel is None) == share
  projections = (m.q, m.k) if share else (m.q_rel, m.k_rel)  # W_{q,r}, W_{k,r} of the paper
  q_rel, k_rel = (jnp.einsum("rd,dhk->rhk", m.rel_embed[...], w[...]) for w in projections)
  mask = masks.causal() if causal else None
  heads = disentangled_attention(q, k, v, q_rel, k_rel, max_distance=max_distance, mask=mask)
  assert_close(m(x), _out(m, heads), TOL_EXACT_F32, f"causal={causal} share={share}")


def test_softplus_is_served_by_the_attention_mixer():
  assert registry.mixer_class("softplus") is nn.Attention
  m, x = _mixer("softplus", train_len=16, reweight_power=2.0), _x()
  assert m(x).shape == x.shape


@pytest.mark.parametrize(
  "name,options",
  [
    ("gated", {}),
    ("sinks", {"num_sink_tokens": 2}),
    ("moh", {"block_q": 4}),
    ("aaren", {}),
    ("diffqkv", {"q_aug_dim": 12}),
  ],
)
def test_xla_mixer_matches_reference_values_and_gradients(name, options):
  ref_options = {k: v for k, v in options.items() if k != "block_q"}
  fast, ref = _mixer(name, "xla", 3, **options), _mixer(name, "reference", 3, **ref_options)
  x = _x(4, t=11)

  @nnx.jit
  def value_and_grad(module, x):
    return nnx.value_and_grad(lambda m, x: jnp.sum(jnp.sin(m(x))), argnums=(0, 1))(module, x)

  (v_fast, g_fast), (v_ref, g_ref) = value_and_grad(fast, x), value_and_grad(ref, x)
  assert_close(v_fast, v_ref, TOL_BLOCKED_F32, "values")
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref), strict=True):
    assert_close(a, b, 2 * TOL_BLOCKED_F32, "gradients")


def test_bad_options_are_rejected():
  with pytest.raises(ValueError, match="gate must be 'elementwise' or 'headwise'"):
    _mixer("gated", gate="channel")
  with pytest.raises(ValueError, match="num_shared_heads"):
    _mixer("moh", num_shared_heads=4)
  with pytest.raises(ValueError, match="num_sink_tokens must be >= 0"):
    _mixer("sinks", num_sink_tokens=-1)
  with pytest.raises(ValueError, match="num_k_heads=3 must divide"):
    _mixer("diffqkv", num_k_heads=3)
  assert softmax_variants.AUX_LOSS == "aux_loss"


@pytest.mark.parametrize("value_temperature", [False, True])
def test_selective_mixer_scales_queries_by_position_and_token(value_temperature):
  m, x = _mixer("selective", value_temperature=value_temperature), _x()
  keys = jax.random.split(jax.random.key(5), 3)
  m.temp_pos[...] = random_normal(keys[0], (HEADS,))
  m.temp_q[...] = random_normal(keys[1], (HEADS, HEAD_DIM))
  q, k, v = _qkv(m, x)
  token = jnp.einsum("btd,dhk,hk->bth", x, m.q[...], m.temp_q[...])  # before rotary
  position = jnp.log(jnp.arange(1, x.shape[1] + 1.0))[None, :, None]
  q_temp = 1 + jax.nn.sigmoid(m.temp_pos[...]) * position + jnp.tanh(token)
  values = v
  if value_temperature:
    m.temp_v[...] = random_normal(keys[2], (KV_HEADS, HEAD_DIM))
    values = v * (1 + jnp.tanh(jnp.einsum("bthk,hk->bth", v, m.temp_v[...])))[..., None]
  else:
    assert m.temp_v is None
  heads = dot_product_attention(q * q_temp[..., None], k, values, mask=masks.causal())
  assert_close(m(x), _out(m, heads), TOL_EXACT_F32, f"value_temperature={value_temperature}")
  grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(m)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads.temp_pos[...]).max()) > 0


@pytest.mark.parametrize("causal", [True, False])
def test_gaussian_mixer_weighs_its_value_projection(causal):
  m, x = _mixer("gaussian", causal=causal), _x()
  keys = jax.random.split(jax.random.key(6), 2)
  m.mean_offset[...] = 0.3 * random_normal(keys[0], (HEADS,))
  m.log_var_scale[...] = random_normal(keys[1], (HEADS,))
  v = jnp.einsum("btd,dhk->bthk", x, m.v[...])
  heads = gaussian_attention(
    v, m.mean_offset[...], jnp.exp(m.log_var_scale[...]), causal=causal, impl="reference"
  )
  assert_close(m(x), _out(m, heads), TOL_EXACT_F32, f"causal={causal}")
  grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(m)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads.log_var_scale[...]).max()) > 0


def test_cca_is_served_by_the_attention_mixer_with_its_options():
  assert registry.mixer_class("cca") is nn.Attention
  m, x = _mixer("cca", group_size=4, window=3), _x()
  q, k, v = _qkv(m, x)
  heads = cca_attention(q, k, v, group_size=4, window=3, impl="reference")
  assert_close(m(x), _out(m, heads), TOL_EXACT_F32, "cca")
  grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(m)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
