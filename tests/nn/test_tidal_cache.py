"""The TidalDecode cache policy: a sparse layer attends exactly to the positions its selection
layer's query attended to most (summed over all heads) plus the current token, checked against
a numpy transcription; a top_k covering the cache is the full model, a small one changes only
the decode steps; layer roles; a hybrid with a linear layer; generation under jit; the cache's
sharding names; bad policies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import nn
from attnjax.nn import TidalDecode, tidal
from attnjax.nn import cache as cache_lib
from tests.helpers import TOL_BLOCKED_F32, assert_close, rel_error
from tests.nn.test_streaming_cache import streamed

VOCAB, EMBED, HEADS, KV_HEADS = 17, 32, 4, 2


def model(pattern="softmax,softmax,softmax", seed=0):
  return nn.DecoderLM(
    vocab_size=VOCAB, embed_dim=EMBED, depth=pattern.count(",") + 1, num_heads=HEADS,
    num_kv_heads=KV_HEADS, mlp_dim=16, layer_pattern=pattern, rngs=nnx.Rngs(seed),
  )  # fmt: skip


def tokens(seed, batch=2, seq=15):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)), jnp.int32)


def decoded(lm, ids, policy, prefill=4):
  """Logits of a `prefill`-token chunk then token-by-token decoding of `ids` under `policy`."""
  return streamed(lm, ids, policy, chunks=(prefill,) + (1,) * (ids.shape[1] - prefill))[0]


def test_layer_roles():
  roles = TidalDecode(top_k=4, selection_layers=(1, 3)).layer_roles(5)
  assert [r.role for r in roles] == ["dense", "select", "sparse", "select", "sparse"]


@pytest.mark.parametrize("pattern", ["softmax,softmax,softmax", "softmax,gla,softmax"])
def test_a_top_k_covering_the_cache_is_the_full_model(pattern):
  lm, ids = model(pattern), tokens(0)
  got = decoded(lm, ids, TidalDecode(top_k=15, selection_layers=(0,)))
  assert_close(got, lm(ids), TOL_BLOCKED_F32, pattern)


def test_a_small_top_k_changes_only_the_decode_steps():
  lm, ids = model(), tokens(1)
  got, full = decoded(lm, ids, TidalDecode(top_k=2, selection_layers=(1,))), lm(ids)
  assert_close(got[:, :4], full[:, :4], TOL_BLOCKED_F32, "prefill")
  assert rel_error(got[:, 4:], full[:, 4:]) > 1e-2


def _probs(q, k, allowed):
  """Softmax probabilities `[b, h, kv]` of one query per head, numpy float64, GQA by repeat."""
  groups = q.shape[1] // k.shape[2]
  k = np.repeat(k, groups, axis=2)
  logits = np.einsum("bhd,bkhd->bhk", q, k) / np.sqrt(q.shape[-1])
  z = np.where(allowed, logits, -np.inf)
  p = np.exp(z - z.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def test_a_sparse_layer_attends_to_the_selection_and_the_current_token():
  """A selection layer and a sparse layer (no rotary, their own inputs), decoded after a
  6-token prefill: the chosen positions are the top-k of the selection layer's attention summed
  over its heads, and the sparse layer's output is attention over them and the current one."""
  top_k, prefill, seq = 3, 6, 12
  select, sparse = (
    nn.Attention(EMBED, num_heads=HEADS, num_kv_heads=KV_HEADS, use_rope=False, rngs=nnx.Rngs(i))
    for i in (5, 6)
  )
  x0, x1 = (jax.random.normal(jax.random.key(i), (2, seq, EMBED)) for i in (7, 8))
  (q0, k0, _), (q1, k1, v1) = (
    [np.asarray(a, np.float64) for a in layer.project_qkv(x)[1:]]
    for layer, x in ((select, x0), (sparse, x1))
  )
  roles = TidalDecode(top_k=top_k, selection_layers=(0,)).layer_roles(2)
  cache0 = select.init_cache(2, seq, jnp.float32, roles[0])
  cache1 = sparse.init_cache(2, seq, jnp.float32, roles[1])
  _, cache0 = select.decode(x0[:, :prefill], cache0, jnp.int32(0))
  _, cache1 = sparse.decode(x1[:, :prefill], cache1, jnp.int32(0))
  for p in range(prefill, seq):
    _, cache0 = select.decode(x0[:, p : p + 1], cache0, jnp.int32(p))
    mass = _probs(q0[:, p], k0, np.arange(seq) <= p).sum(1)
    chosen = np.sort(np.argsort(-mass, axis=-1)[:, :top_k], axis=-1)
    np.testing.assert_array_equal(np.sort(np.asarray(cache0["chosen"]), axis=-1), chosen)
    allowed = np.zeros((2, 1, seq), bool)
    for b in range(2):
      allowed[b, 0, list(chosen[b]) + [p]] = True
    heads_out = np.einsum(
      "bhk,bkhd->bhd", _probs(q1[:, p], k1, allowed), np.repeat(v1, HEADS // KV_HEADS, axis=2)
    )
    want = sparse.project_out(jnp.asarray(heads_out[:, None], jnp.float32))
    out, cache1 = sparse.decode(x1[:, p : p + 1], {**cache1, "chosen": cache0["chosen"]}, p)
    assert_close(out, want, TOL_BLOCKED_F32, f"sparse layer at position {p}")


def test_generation_under_jit_and_sharding_names():
  lm, ids = model(), tokens(2, seq=6)
  out = nn.generate(lm, ids, 5, cache_policy=TidalDecode(top_k=3, selection_layers=(1,)))
  assert out.shape == (2, 11) and bool(jnp.all(out[:, :6] == ids))
  cache = lm.init_cache(2, 8, policy=TidalDecode(top_k=3, selection_layers=(1,)))
  specs = cache_lib.logical_specs(cache)["layers"]
  assert all(s["chosen"] == jax.sharding.PartitionSpec("batch", None) for s in specs)
  assert [layer["policy"].role for layer in cache["layers"]] == ["dense", "select", "sparse"]


@pytest.mark.parametrize(
  "kwargs, message",
  [(dict(top_k=0), "top_k must be an int >= 1"),
   (dict(selection_layers=()), "selection_layers must be distinct"),
   (dict(selection_layers=(2, 1)), "ascending"),
   (dict(selection_layers=(-1,)), "selection_layers must be distinct")],
)  # fmt: skip
def test_bad_policies_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    TidalDecode(**kwargs)


def test_a_selection_layer_past_the_model_and_a_mixer_level_policy_raise():
  with pytest.raises(ValueError, match=r"name a layer the model's 3 layers do not have"):
    model().init_cache(2, 8, policy=TidalDecode(selection_layers=(3,)))
  mixer = nn.Attention(EMBED, num_heads=HEADS, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="give it to DecoderLM.init_cache"):
    mixer.init_cache(2, 8, jnp.float32, TidalDecode())
  assert tidal.is_tidal(mixer.init_cache(2, 8, jnp.float32, tidal.LayerRole("sparse", 2)))
