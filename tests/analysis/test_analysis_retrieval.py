"""Retrieval scores on constructed copy heads, and the copy batches they are computed on."""

import numpy as np
import pytest

from attnjax.analysis import copy_batch, retrieval_scores
from attnjax.data import MQAR, Passkey, SelectiveCopy


@pytest.mark.parametrize(
  "task",
  [
    Passkey(seq_len=48, passkey_len=4, vocab_size=32),
    SelectiveCopy(seq_len=40, num_tokens=6, vocab_size=12),
    MQAR(seq_len=32, num_pairs=4, vocab_size=64),
  ],
  ids=lambda task: type(task).__name__,
)
def test_copy_batch_points_every_answer_at_the_token_it_copies(task):
  batch = copy_batch(task, batch_size=5, seed=3)
  queries, sources = batch["query_positions"], batch["source_positions"]
  assert queries.shape == sources.shape and queries.shape[0] == 5
  targets = np.take_along_axis(batch["targets"], queries, axis=1)
  np.testing.assert_array_equal(targets, np.take_along_axis(batch["inputs"], sources, axis=1))
  assert (np.take_along_axis(batch["weights"], queries, axis=1) == 1).all()
  assert (sources < queries).all()  # copied from the context, causally visible


def _copy_head_maps(batch, heads=3, noise_seed=0):
  """Head 0 puts its peak on the source of every answer; the other heads are random."""
  inputs = batch["inputs"]
  b, t = inputs.shape
  rng = np.random.default_rng(noise_seed)
  weights = rng.dirichlet(np.ones(t), size=(b, heads, t))
  rows = np.arange(b)[:, None]
  weights[rows, 0, batch["query_positions"], :] = 0.1 / t
  weights[rows, 0, batch["query_positions"], batch["source_positions"]] = 0.9
  return weights


def test_retrieval_score_is_one_for_a_copy_head_and_near_zero_for_random_heads():
  batch = copy_batch(Passkey(seq_len=64, passkey_len=5, vocab_size=32), batch_size=16)
  scores = retrieval_scores(
    {0: _copy_head_maps(batch)}, batch["query_positions"], batch["source_positions"]
  )
  assert scores[0][0] == 1.0
  # A random head hits the source with probability 1/64 per answer.
  assert (scores[0][1:] < 0.1).all()


def test_retrieval_inputs_are_checked():
  batch = copy_batch(MQAR(seq_len=32, num_pairs=4, vocab_size=64), batch_size=2)
  maps = {0: _copy_head_maps(batch)}
  with pytest.raises(ValueError, match="source_positions"):
    retrieval_scores(maps, batch["query_positions"], batch["source_positions"][:, :2])
  with pytest.raises(ValueError, match="batch=3"):
    retrieval_scores(maps, np.zeros((3, 4), int), np.zeros((3, 4), int))
  with pytest.raises(ValueError, match="task"):
    copy_batch("passkey", batch_size=2)
