"""The Recycled Attention cache policy: a recycled step attends exactly to the top-k keys of
the last full step (per kv head, by its last query's attention summed over the group) plus the
tokens since, checked against a numpy transcription; stride 1, a top_k covering the cache and
the similarity trigger at 1 are the full model; GQA, a sliding-window variant, prefill chunks,
generation under jit, the cache's sharding names and bad policies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import nn
from attnjax.nn import RecycledAttention
from attnjax.nn import cache as cache_lib
from tests.helpers import TOL_BLOCKED_F32, assert_close, rel_error
from tests.nn.test_streaming_cache import streamed

VOCAB, EMBED, HEADS, KV_HEADS = 17, 32, 4, 2


def model(pattern="softmax,softmax", seed=0, **options):
  return nn.DecoderLM(
    vocab_size=VOCAB, embed_dim=EMBED, depth=pattern.count(",") + 1, num_heads=HEADS,
    num_kv_heads=KV_HEADS,
    mlp_dim=16, layer_pattern=pattern, mixer_options=options or None, rngs=nnx.Rngs(seed),
  )  # fmt: skip


def tokens(seed, batch=2, seq=19):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)), jnp.int32)


def decoded(lm, ids, policy, prefill=4):
  """Logits of a `prefill`-token chunk then token-by-token decoding of `ids` under `policy`."""
  return streamed(lm, ids, policy, chunks=(prefill,) + (1,) * (ids.shape[1] - prefill))[0]


@pytest.mark.parametrize(
  "policy",
  [RecycledAttention(stride=1, top_k=2), RecycledAttention(stride=5, top_k=19),
   RecycledAttention(stride=4, top_k=2, similarity=1.0)],
  ids=["stride_1", "top_k_covers_the_cache", "similarity_trigger_always"],
)  # fmt: skip
def test_policies_that_always_see_every_key_are_the_full_model(policy):
  lm, ids = model(), tokens(0)
  assert_close(decoded(lm, ids, policy), lm(ids), TOL_BLOCKED_F32, str(policy))


def test_recycling_changes_the_logits_of_a_small_top_k():
  """Not vacuous: with 2 kept keys the steps between full ones (the 4-token prefill ends at
  position 3; full steps at 8, 13, 18) differ from the full model, the full steps of a
  one-layer model (its keys are exact) do not."""
  lm, ids = model("softmax"), tokens(1)
  got, full = decoded(lm, ids, RecycledAttention(stride=5, top_k=2)), lm(ids)
  full_steps = [0, 1, 2, 3, 8, 13, 18]
  assert_close(got[:, full_steps], full[:, full_steps], TOL_BLOCKED_F32, "full steps")
  assert rel_error(got[:, 4:8], full[:, 4:8]) > 1e-2


def _oracle_outputs(q, k, v, policy, prefill):
  """numpy transcription of the policy on one layer's `q [b, t, h, d]`, `k, v [b, t, kv, d]`:
  per position, the attended keys' probabilities and the heads' outputs (no rotary: q, k as
  given, scale d^-1/2)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, d = q.shape
  groups = h // k.shape[2]
  k, v = (np.repeat(x, groups, axis=2) for x in (k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
  outs, full_at, kept = np.zeros_like(q), None, None
  for p in range(prefill - 1, t):
    full = p == prefill - 1 or p - full_at >= policy.stride
    allowed = np.zeros((b, h, t), bool)
    if full:
      allowed[:, :, : p + 1] = True
    else:
      for bi in range(b):
        for hi in range(h):
          allowed[bi, hi, list(kept[bi, hi // groups]) + list(range(full_at + 1, p + 1))] = True
    z = np.where(allowed, logits[:, :, p], -np.inf)
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    outs[:, p] = np.einsum("bhk,bkhd->bhd", probs, v)
    if full:
      mass = probs.reshape(b, h // groups, groups, t).sum(2)  # per kv head
      kept = np.argsort(-mass, axis=-1)[..., : policy.top_k]
      full_at = p
  return outs


def test_a_recycled_step_attends_to_the_top_k_of_the_last_full_step_and_the_tokens_since():
  policy, prefill, seq = RecycledAttention(stride=4, top_k=3), 6, 17
  mixer = nn.Attention(
    EMBED, num_heads=HEADS, num_kv_heads=KV_HEADS, use_rope=False, rngs=nnx.Rngs(3)
  )
  x = jax.random.normal(jax.random.key(4), (2, seq, EMBED))
  _, q, k, v = mixer.project_qkv(x)
  want = mixer.project_out(jnp.asarray(_oracle_outputs(q, k, v, policy, prefill), jnp.float32))
  cache = mixer.init_cache(2, seq, jnp.float32, policy)
  step = jax.jit(lambda cache, x, position: mixer.decode(x, cache, position))
  out, cache = step(cache, x[:, :prefill], jnp.int32(0))
  assert_close(out[:, -1], want[:, prefill - 1], TOL_BLOCKED_F32, "prefill (a full step)")
  for p in range(prefill, seq):
    out, cache = step(cache, x[:, p : p + 1], jnp.int32(p))
    assert_close(out[:, 0], want[:, p], TOL_BLOCKED_F32, f"position {p}")
  assert int(cache["full_at"]) == 13 and cache["selected"].shape == (2, KV_HEADS, 3)


def test_window_variant_and_generation_under_jit():
  lm = model("sliding_window,softmax", sliding_window={"window": 6})
  ids = tokens(2, seq=9)
  full = decoded(lm, ids, RecycledAttention(stride=1, top_k=1))
  assert_close(full, lm(ids), TOL_BLOCKED_F32, "sliding window, stride 1")
  out = nn.generate(lm, ids[:, :5], 7, cache_policy=RecycledAttention(stride=3, top_k=2))
  assert out.shape == (2, 12) and bool(jnp.all(out[:, :5] == ids[:, :5]))


def test_cache_arrays_name_their_sharding_axes():
  cache = model().init_cache(2, 8, policy=RecycledAttention(stride=2, top_k=3))
  specs = cache_lib.logical_specs(cache)["layers"][0]
  assert specs["selected"] == jax.sharding.PartitionSpec("batch", "kv_heads", None)
  assert specs["full_query"] == jax.sharding.PartitionSpec("batch", "heads", None)
  assert cache["layers"][0]["selected"].shape == (2, KV_HEADS, 3)


@pytest.mark.parametrize(
  "kwargs, message",
  [(dict(stride=0), "stride must be an int >= 1"), (dict(top_k=0), "top_k must be an int >= 1"),
   (dict(similarity=1.5), "similarity must be in")],
)  # fmt: skip
def test_bad_policies_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    RecycledAttention(**kwargs)


def test_a_variant_without_a_mask_raises_naming_it():
  with pytest.raises(ValueError, match="'softplus' has no mask a cache policy can restrict"):
    model("softplus,softmax", softplus={"train_len": 6}).init_cache(
      2, 8, policy=RecycledAttention()
    )
