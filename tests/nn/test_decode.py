"""Decoding with `DecoderLM.init_cache` / `decode` reproduces the full forward's logits, for
every variant that decodes, token by token and in prefill chunks of odd sizes, in float32
and bfloat16; `generate` is the full model's greedy continuation; bad input and variants
without a cache raise ValueErrors naming them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from attnjax import nn
from attnjax.nn import cache as cache_lib
from attnjax.nn import generate, sample_logits
from attnjax.ops.softmax import cached
from attnjax.training.config import DEFAULT_RULES
from attnjax.training.sharding import make_mesh, tree_shardings
from tests.helpers import TOL_BF16, TOL_BLOCKED_F32, assert_close

VOCAB, SEQ = 13, 11
# Variant -> its options; every one in a hybrid with a softmax layer, 4 query / 2 kv heads.
DECODING = {
  "softmax": {},
  "sliding_window": {"window": 3},
  "chunked": {"chunk_size": 4},
  "prefix_lm": {"prefix_len": 3},
  "gated": {"gate": "headwise"},
  "sinks": {"num_sink_tokens": 2},
  "selective": {},
  "moh": {"top_k": 1},
  "softplus": {"train_len": 6, "reweight_power": 2.0},
  "aaren": {},
  "neighborhood": {"kernel_size": 3, "dilation": 2},
  "gaussian": {},
  "diffqkv": {"q_aug_dim": 12},
  "linear": {},
  "based": {},
  "gla": {},
  "lightning": {},
  "retention": {},
  "hgrn2": {},
  "flowformer": {},
  "lightnet": {},
  "deltanet": {},
  "gated_deltanet": {},
}
# Prefill chunks; the first covers prefix_lm's 3-token bidirectional prefix.
CHUNKS = (3, 1, 5, 2)


def model(name, dtype=jnp.float32, seed=0):
  options = DECODING.get(name, {})
  return nn.DecoderLM(
    vocab_size=VOCAB, embed_dim=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=16,
    layer_pattern=f"{name},softmax", mixer_options={name: options} if options else None,
    dtype=dtype, rngs=nnx.Rngs(seed),
  )  # fmt: skip


def tokens(seed, batch=2, seq=SEQ):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)), jnp.int32)


def decoded(lm, ids, chunks, max_len=16):
  cache = lm.init_cache(ids.shape[0], max_len)
  step = jax.jit(lambda cache, chunk: lm.decode(chunk, cache))
  logits, start = [], 0
  for size in chunks:
    out, cache = step(cache, ids[:, start : start + size])
    logits.append(out)
    start += size
  assert int(cache["position"]) == start
  return jnp.concatenate(logits, axis=1)


@pytest.mark.parametrize("name", sorted(DECODING))
def test_chunks_and_single_tokens_give_the_full_forward_logits(name):
  lm, ids = model(name), tokens(1)
  want = lm(ids)
  assert_close(decoded(lm, ids, CHUNKS), want, TOL_BLOCKED_F32, f"{name} in chunks {CHUNKS}")
  singles = (3,) + (1,) * (SEQ - 3) if name == "prefix_lm" else (1,) * SEQ
  assert_close(decoded(lm, ids, singles), want, TOL_BLOCKED_F32, f"{name} token by token")


@pytest.mark.parametrize("name", ["softmax", "prefix_lm", "sliding_window", "sinks"])
def test_long_prefill_chunks_attend_in_query_blocks(name, monkeypatch):
  monkeypatch.setattr(cached, "QUERY_BLOCK", 2)  # chunks of 3 and 5 queries: 2 and 3 blocks
  lm, ids = model(name), tokens(9)
  assert_close(decoded(lm, ids, CHUNKS), lm(ids), TOL_BLOCKED_F32, f"{name} in query blocks")


@pytest.mark.parametrize(
  "name", ["softmax", "sliding_window", "sinks", "gla", "gated_deltanet", "aaren"]
)
def test_bfloat16_decoding_matches_the_bfloat16_forward(name):
  lm, ids = model(name, jnp.bfloat16), tokens(2)
  assert lm.init_cache(2, 16)["layers"][1]["k"].dtype == jnp.bfloat16
  assert_close(decoded(lm, ids, CHUNKS), lm(ids), 4 * TOL_BF16, f"{name} bfloat16")


@pytest.mark.parametrize("options,rows", [({"window": 3}, 2), ({"window": 1}, 0), ({}, 16)])
def test_sliding_window_keeps_a_ring_of_its_lookback(options, rows):
  lm = nn.DecoderLM(vocab_size=VOCAB, embed_dim=32, depth=1, num_heads=4, num_kv_heads=2,
                    mlp_dim=0, layer_pattern="sliding_window", rngs=nnx.Rngs(7),
                    mixer_options={"sliding_window": options} if options else None)  # fmt: skip
  cache = lm.init_cache(2, 16)
  assert cache["layers"][0]["k"].shape == (2, rows, 2, 8)
  ids = tokens(8, seq=14)
  assert_close(decoded(lm, ids, (5, 1, 1, 4, 3)), lm(ids), TOL_BLOCKED_F32, f"ring {rows}")


def test_generate_greedy_is_the_full_models_argmax_continuation():
  lm, prompt = model("gla", seed=3), tokens(4, seq=5)
  out = generate(lm, prompt, 6)
  np.testing.assert_array_equal(out[:, :5], prompt)
  # The model is causal: one forward over the continuation gives every step's argmax.
  want = jnp.argmax(lm(out[:, :-1])[:, 4:], axis=-1).astype(jnp.int32)
  np.testing.assert_array_equal(out[:, 5:], want)
  np.testing.assert_array_equal(generate(lm, prompt, 0), prompt)


def test_sampling_respects_top_k_top_p_and_temperature():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 512))
  keys = jax.random.split(jax.random.key(0), 4)
  top2 = sample_logits(logits, keys[0], temperature=1.0, top_k=2)
  assert set(np.unique(top2)) == {0, 1}
  nucleus = sample_logits(logits, keys[1], temperature=1.0, top_p=0.75)  # 0.5 + 0.3 >= 0.75
  assert set(np.unique(nucleus)) == {0, 1}
  sampled = sample_logits(logits, keys[2], temperature=1.0)
  assert set(np.unique(sampled)) == {0, 1, 2, 3}
  assert 0.4 < float(jnp.mean(sampled == 0)) < 0.6
  np.testing.assert_array_equal(sample_logits(logits, None), np.zeros(512))
  lm, prompt = model("softmax"), tokens(5, seq=4)
  greedy = generate(lm, prompt, 4)
  np.testing.assert_array_equal(
    generate(lm, prompt, 4, temperature=0.7, top_k=1, rng=jax.random.key(1)), greedy
  )


@pytest.mark.parametrize("name", ["cca", "halo"])
def test_variants_without_a_cache_raise_naming_themselves(name):
  with pytest.raises(ValueError, match=f"variant {name!r} cannot decode"):
    model(name).init_cache(2, 16)


def test_bad_decoding_input_raises():
  lm = model("softmax")
  cache = lm.init_cache(2, 8)
  with pytest.raises(ValueError, match="max_len=8"):
    lm.decode(tokens(6, seq=9), cache)
  with pytest.raises(ValueError, match="batch 3"):
    lm.decode(tokens(6, batch=3, seq=2), cache)
  with pytest.raises(ValueError, match=r"tokens must be \[batch, n\]"):
    lm.decode(jnp.zeros((2,), jnp.int32), cache)
  with pytest.raises(ValueError, match="max_len must be a positive int"):
    lm.init_cache(2, 0)
  with pytest.raises(ValueError, match="needs rng"):
    generate(lm, tokens(6, seq=2), 3, temperature=1.0)
  with pytest.raises(ValueError, match="top_p must be in"):
    generate(lm, tokens(6, seq=2), 3, top_p=0.0)
  with pytest.raises(ValueError, match="prompt must be"):
    generate(lm, jnp.zeros((2, 0), jnp.int32), 3)


def test_a_cache_sharded_like_the_model_decodes_the_same():
  mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "seq": 1}, jax.devices()[:4])
  lm, ids = model("gated_deltanet"), tokens(10, batch=4)
  want = decoded(lm, ids, (6, 1), max_len=8)
  cache = lm.init_cache(4, 8)
  _, cache = lm.decode(ids[:, :6], cache)
  shardings = tree_shardings(cache_lib.logical_specs(cache), DEFAULT_RULES, mesh)
  cache = jax.device_put(cache, shardings)
  assert cache["layers"][1]["k"].sharding.spec == PartitionSpec(
    ("data", "fsdp"), None, "tensor", None
  )
  assert cache["layers"][0]["state"].sharding.spec[:2] == (("data", "fsdp"), "tensor")
  logits, cache = jax.jit(lambda cache, chunk: lm.decode(chunk, cache))(cache, ids[:, 6:7])
  assert_close(logits, want[:, 6:7], TOL_BLOCKED_F32, "sharded cache")
