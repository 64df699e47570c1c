"""LASP-2 and ZeCO for the delta rule on 4 simulated devices equal one device (values, final state,
gradients of every input), with GQA, an initial state, packed documents that start inside a
shard, exactly at a shard boundary and span shards; inside a model; its communication does
not grow with the sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import nn
from attnjax.nn.seq_parallel import SeqParallel
from attnjax.ops.delta import api
from attnjax.parallel import comms, sequence_parallel
from tests.helpers import TOL_BLOCKED_F32, assert_close, assert_matches_reference, seq_mesh


def _inputs(seed, seq=40, heads=4, kv_heads=2, key_dim=8, value_dim=6):
  keys = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(keys[0], (2, seq, heads, key_dim))
  k = jax.random.normal(keys[1], (2, seq, kv_heads, key_dim))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(keys[2], (2, seq, kv_heads, value_dim))
  beta = jax.nn.sigmoid(jax.random.normal(keys[3], (2, seq, heads)))
  log_decay = jax.nn.log_sigmoid(2.0 + jax.random.normal(keys[4], (2, seq, heads)))
  state = jax.random.normal(keys[5], (2, heads, key_dim, value_dim))
  return (q, k, v, beta), {"log_decay": log_decay, "initial_state": state}


# 40 tokens on 4 devices: shards [0, 10), [10, 20), [20, 30), [30, 40).
SEGMENTS = np.stack([
  np.repeat([0, 1, 2, 3], [7, 3, 18, 12]),  # starts inside shards, one at the boundary 10
  np.repeat([0, 1], [30, 10]),  # a document spanning three shards, one starting at 30
])  # fmt: skip


STRATEGIES = [("lasp2", {}), ("zeco", {}), ("zeco", {"pieces": 1})]


@pytest.mark.parametrize("strategy,options", STRATEGIES, ids=["lasp2", "zeco", "zeco_one_piece"])
@pytest.mark.parametrize("segments", [False, True], ids=["one_document", "packed"])
def test_equals_one_device(strategy, options, segments):
  args, kwargs = _inputs(0)
  ids = jnp.asarray(SEGMENTS) if segments else None
  sharded = sequence_parallel(api.delta_rule_attention, seq_mesh(4), strategy=strategy, **options)

  def parallel(q, k, v, beta, **kw):
    return sharded(q, k, v, beta, segment_ids=ids, chunk_size=4, impl="xla",
                   return_final_state=True, **kw)  # fmt: skip

  def single(q, k, v, beta, **kw):
    return api.delta_rule_attention(q, k, v, beta, segment_ids=ids, impl="reference",
                                    return_final_state=True, **kw)  # fmt: skip

  assert_matches_reference(parallel, single, args, kwargs, TOL_BLOCKED_F32, f"{strategy} delta")


@pytest.mark.parametrize("strategy", ["lasp2", "zeco"])
def test_gated_deltanet_model_splits_its_layers_and_equals_one_device(strategy):
  model_kwargs = dict(vocab_size=11, embed_dim=16, depth=2, num_heads=2, mlp_dim=16,
                      layer_pattern="gated_deltanet,softmax")  # fmt: skip
  single = nn.DecoderLM(**model_kwargs, rngs=nnx.Rngs(0))
  context = SeqParallel(seq_mesh(4), linear=strategy)
  sharded = nn.DecoderLM(**model_kwargs, rngs=nnx.Rngs(0), seq_parallel=context)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 11, (2, 32)))
  assert_close(sharded(tokens), single(tokens), TOL_BLOCKED_F32, "logits")


@pytest.mark.parametrize("strategy", ["lasp2", "zeco"])
def test_communication_is_independent_of_the_sequence_length(strategy):
  sharded = sequence_parallel("gated_deltanet", seq_mesh(4), strategy=strategy)
  sent = []
  for seq in (64, 256):
    (q, k, v, beta), kwargs = _inputs(2, seq=seq)
    lowered = jax.jit(
      lambda q, k, v, beta, log_decay: sharded(q, k, v, beta=beta, log_decay=log_decay)
    ).lower(q, k, v, beta, kwargs["log_decay"])
    sent.append(comms.bytes_sent_per_device(comms.collectives(lowered.compile().as_text(), 4), 4))
  assert sent[0] == sent[1] > 0
  state = 2 * 4 * 8 * 6 * 4  # batch x heads x key_dim x value_dim float32
  minimum = {"lasp2": 3 * (state + 2 * 4 * 8 * 8 * 4), "zeco": state}[strategy]
  assert sent[0] == minimum


@pytest.mark.parametrize("strategy", ["lasp2", "zeco"])
def test_refuses_a_sequence_that_does_not_split(strategy):
  (q, k, v, beta), _ = _inputs(3, seq=42)
  sharded = sequence_parallel(api.delta_rule_attention, seq_mesh(4), strategy=strategy)
  with pytest.raises(ValueError, match="divisible"):
    sharded(q, k, v, beta)


def test_zeco_refuses_bad_pieces():
  (q, k, v, beta), _ = _inputs(3)
  sharded = sequence_parallel(api.delta_rule_attention, seq_mesh(4), strategy="zeco", pieces=0)
  with pytest.raises(ValueError, match="pieces must be a positive int"):
    sharded(q, k, v, beta)
