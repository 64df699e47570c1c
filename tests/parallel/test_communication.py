"""Collectives read from compiled HLO: LASP-2 and ZeCO send state-sized messages only."""

import jax
import jax.numpy as jnp
import pytest

from attnjax import masks
from attnjax.ops import dot_product_attention, linear_attention
from attnjax.parallel import comms, sequence_parallel
from tests.helpers import seq_mesh

PARTS = 4
BATCH, HEADS, DIM = 1, 2, 8
STATE_BYTES = BATCH * HEADS * DIM * DIM * 4


def _train_step_collectives(strategy, seq_len):
  x = jnp.ones((BATCH, seq_len, HEADS, DIM))
  log_decay = jnp.full((BATCH, seq_len, HEADS), -0.1)
  sharded = sequence_parallel(linear_attention, seq_mesh(), strategy=strategy)

  def loss(q, k, v):
    return jnp.sum(sharded(q, k, v, log_decay=log_decay, impl="xla", chunk_size=8) ** 2)

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile().as_text()
  return comms.collectives(hlo, PARTS)


@pytest.mark.parametrize("strategy", ["lasp2", "zeco"])
def test_linear_strategies_send_no_tensor_growing_with_length(strategy):
  short, long = _train_step_collectives(strategy, 64), _train_step_collectives(strategy, 256)
  assert short, "no collective found"
  assert comms.summary(short) == comms.summary(long)
  assert max(c.nbytes for c in long) <= PARTS * STATE_BYTES
  sent = comms.bytes_sent_per_device(long, PARTS)
  if strategy == "zeco":  # one state forward, one state gradient backward
    assert sent == 2 * STATE_BYTES
  else:  # all-gather and reduce-scatter of P states
    assert sent == 2 * (PARTS - 1) * STATE_BYTES


def test_ring_sends_kv_growing_with_length():
  def sent(seq_len):
    x = jnp.ones((BATCH, seq_len, HEADS, DIM))
    sharded = sequence_parallel(dot_product_attention, seq_mesh(), strategy="ring", zigzag=False)
    fn = jax.jit(lambda q, k, v: sharded(q, k, v, mask=masks.causal(), impl="reference"))
    found = comms.collectives(fn.lower(x, x, x).compile().as_text(), PARTS)
    return comms.bytes_sent_per_device(found, PARTS)

  kv_chunk = 2 * BATCH * (64 // PARTS) * HEADS * DIM * 4
  assert sent(64) == (PARTS - 1) * kv_chunk
  assert sent(128) == 2 * sent(64)


def test_loop_bodies_count_trip_times():
  mesh = seq_mesh()

  def body(x):
    return jax.lax.fori_loop(0, 5, lambda i, y: jax.lax.psum(y, "seq") * 0.5, x)

  fn = jax.jit(
    jax.shard_map(
      body,
      mesh=mesh,
      in_specs=jax.sharding.PartitionSpec("seq"),
      out_specs=jax.sharding.PartitionSpec("seq"),
      check_vma=False,
    )
  )
  found = comms.collectives(fn.lower(jnp.ones((PARTS * 3,))).compile().as_text(), PARTS)
  assert [(c.kind, c.runs, c.nbytes) for c in found] == [("all-reduce", 5, 12)]
  assert comms.bytes_sent_per_device(found, PARTS) == 5 * 2 * 12 * (PARTS - 1) / PARTS


def test_theoretical_bytes_by_hand():
  dims = dict(num_devices=4, batch=2, seq_len=64, heads=4, kv_heads=2, head_dim=8, itemsize=2)
  kv_shard = 2 * 16 * 2 * 2 * 8 * 2  # batch x shard x kv_heads x (k, v) x head_dim x bytes
  state = 2 * 4 * 8 * 8 * 4  # float32 [batch, heads, head_dim, head_dim]
  assert comms.theoretical_bytes("ring", **dims) == (3 * kv_shard, 6 * kv_shard)
  assert comms.theoretical_bytes("allgather", **dims) == (3 * kv_shard, 3 * kv_shard)
  ulysses = 2 * 16 * 8 * 2 * (2 * 4 + 2 * 4) * 3 / 4  # kv heads 2 do not split over 4: repeated
  assert comms.theoretical_bytes("ulysses", **dims) == (ulysses, ulysses)
  assert comms.theoretical_bytes("lasp2", **dims) == (3 * state, 3 * state)
  assert comms.theoretical_bytes("zeco", **dims) == (state, state)
  with pytest.raises(ValueError, match="strategy must be one of"):
    comms.theoretical_bytes("tree", **dims)
