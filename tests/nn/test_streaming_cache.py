"""The StreamingLLM cache policy (attention sinks + a recent window, positions within the
cache): equal to full decoding until the first eviction; after it, a one-layer model equals
the model run on the cached tokens alone (the paper's position assignment); window-only equals
the sliding-window variant's full forward at any depth; prefill chunks equal token-by-token;
learned sink logits and tokens, GQA, bf16; memory constant in the stream length; bad policies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import nn
from attnjax.nn import StreamingLLM
from tests.helpers import TOL_BF16, TOL_BLOCKED_F32, assert_close

VOCAB = 17


def model(pattern="softmax", depth=1, dtype=jnp.float32, seed=0, **options):
  return nn.DecoderLM(
    vocab_size=VOCAB, embed_dim=32, depth=depth, num_heads=4, num_kv_heads=2, mlp_dim=16,
    layer_pattern=pattern, mixer_options=options or None, dtype=dtype, rngs=nnx.Rngs(seed),
  )  # fmt: skip


def tokens(seed, batch=2, seq=23):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)), jnp.int32)


def streamed(lm, ids, policy, chunks=None, dtype=None):
  """Logits of decoding `ids` under `policy`, in `chunks` (default: token by token)."""
  cache = lm.init_cache(ids.shape[0], ids.shape[1], dtype, policy=policy)
  step = jax.jit(lambda cache, chunk: lm.decode(chunk, cache))
  logits, start = [], 0
  for size in chunks or (1,) * ids.shape[1]:
    out, cache = step(cache, ids[:, start : start + size])
    logits.append(out)
    start += size
  return jnp.concatenate(logits, axis=1), cache


def test_until_the_first_eviction_it_is_the_full_model():
  lm, ids = model(depth=2), tokens(0, seq=10)
  got, _ = streamed(lm, ids, StreamingLLM(sink_tokens=3, window=7))
  assert_close(got, lm(ids), TOL_BLOCKED_F32, "no eviction yet")


@pytest.mark.parametrize("sink_tokens, window", [(2, 5), (4, 3), (1, 1)])
def test_one_layer_equals_the_model_on_the_cached_tokens(sink_tokens, window):
  """At position t the cache holds positions 0..s-1 and t-w+1..t, renumbered 0..s+w-1: a
  one-layer model's logits are those of the model run on just those tokens."""
  lm, ids = model(), tokens(1, seq=11)
  got, _ = streamed(lm, ids, StreamingLLM(sink_tokens, window))
  for t in range(ids.shape[1]):
    recent = range(max(sink_tokens, t - window + 1), t + 1)
    kept = [p for p in range(min(sink_tokens, t + 1))] + list(recent)
    want = lm(ids[:, kept])[:, -1]
    assert_close(got[:, t], want, TOL_BLOCKED_F32, f"position {t}")


@pytest.mark.parametrize("pattern", ["softmax", "softmax,gla,softmax"])
def test_window_only_equals_the_sliding_window_variant(pattern):
  """`sink_tokens=0` keeps the last `window` keys at their own distances: the same weights run
  as the sliding_window variant, any depth, hybrids included."""
  window = 5
  lm = model(pattern, depth=3)
  windowed = model(pattern.replace("softmax", "sliding_window"), depth=3,
                   sliding_window={"window": window})  # fmt: skip
  nnx.update(windowed, nnx.state(lm))
  ids = tokens(2)
  got, _ = streamed(lm, ids, StreamingLLM(0, window))
  assert_close(got, windowed(ids), TOL_BLOCKED_F32, "window only")


@pytest.mark.parametrize("variant, options", [("softmax", {}), ("sinks", {"num_sink_tokens": 2}),
                                              ("gated", {"gate": "headwise"})])  # fmt: skip
def test_prefill_chunks_equal_token_by_token(variant, options):
  lm = model(f"{variant},softmax", depth=2, **({variant: options} if options else {}))
  ids, policy = tokens(3), StreamingLLM(sink_tokens=2, window=4)
  singles, _ = streamed(lm, ids, policy)
  chunked, _ = streamed(lm, ids, policy, chunks=(7, 1, 9, 6))
  assert_close(chunked, singles, TOL_BLOCKED_F32, f"{variant}: chunks of 7 and 9 > window")


def test_bfloat16_cache_follows_the_float32_one():
  ids, policy = tokens(4), StreamingLLM(2, 6)
  want, _ = streamed(model(depth=2), ids, policy)
  got, _ = streamed(model(depth=2, dtype=jnp.bfloat16), ids, policy, dtype=jnp.bfloat16)
  assert_close(got, want, 4 * TOL_BF16, "bf16")


def test_cache_memory_is_constant_in_the_stream_length():
  lm = model("softmax,gla", depth=2)
  sizes = []
  for max_len in (64, 4096):
    cache = lm.init_cache(2, max_len, policy=StreamingLLM(4, 12))
    sizes.append(sum(x.size for x in jax.tree.leaves(cache["layers"][0])))
  assert sizes[0] == sizes[1] == 2 * 2 * (4 + 12) * 2 * 8  # k and v: batch, rows, kv heads, dim
  # A stream 4x longer than the cache's rows still decodes, finite.
  ids = tokens(5, batch=1, seq=64)
  got, cache = streamed(lm, ids, StreamingLLM(4, 12), chunks=(16, 16, 16, 16))
  assert np.isfinite(np.asarray(got)).all() and int(cache["position"]) == 64


def test_generate_takes_the_policy():
  lm = model(depth=2)
  prompt = tokens(6, batch=1, seq=5)
  policy = StreamingLLM(1, 3)
  out = nn.generate(lm, prompt, 6, cache_policy=policy)
  ids = out[:, :-1]
  logits, _ = streamed(lm, ids, policy, chunks=(5,) + (1,) * 5)
  assert (np.asarray(out[:, 5:]) == np.asarray(jnp.argmax(logits[:, 4:], -1))).all()


@pytest.mark.parametrize(
  "kwargs, message",
  [({"sink_tokens": -1}, "sink_tokens must be an int >= 0"), ({"window": 0}, "window must be"),
   ({"window": 2.5}, "window must be")],
)  # fmt: skip
def test_bad_policies_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    StreamingLLM(**kwargs)


def test_a_policy_that_is_not_one_raises():
  with pytest.raises(ValueError, match="policy must be a StreamingLLM"):
    model().init_cache(1, 8, policy="streaming")
