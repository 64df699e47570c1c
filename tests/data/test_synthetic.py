"""Synthetic recall tasks: answers recoverable from context, determinism, statistics."""

import numpy as np
import pytest

from attnjax import data
from attnjax.data.recall import COPY_MARK, KEY_MARK, QUERY_MARK


def _batch(task, step=0, seed=0, size=16, **kwargs):
  return task.batch(step, seed=seed, global_batch_size=size, **kwargs)


def test_mqar_answers_are_recoverable_from_context():
  task = data.MQAR(seq_len=64, num_pairs=8, vocab_size=128)
  batch = _batch(task, size=32)
  n, half = task.num_pairs, task.vocab_size // 2
  for inputs, targets, weights in zip(
    batch["inputs"], batch["targets"], batch["weights"], strict=True
  ):
    keys, values = inputs[0 : 2 * n : 2], inputs[1 : 2 * n : 2]
    assert len(set(keys)) == n and len(set(values)) == n
    assert keys.min() >= 1 and keys.max() < half and values.min() >= half
    lookup = dict(zip(keys, values, strict=True))
    (answer_positions,) = np.nonzero(weights)
    assert len(answer_positions) == n
    assert answer_positions.min() >= 2 * n and np.all(answer_positions % 2 == 0)
    assert sorted(inputs[answer_positions]) == sorted(keys)  # every key is queried once
    for pos in answer_positions:
      assert targets[pos] == lookup[inputs[pos]]


def test_mqar_is_deterministic_by_seed_and_step_and_split_by_process():
  task = data.MQAR(seq_len=32, num_pairs=4, vocab_size=64)
  a, b = _batch(task, step=3), _batch(task, step=3)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["inputs"], _batch(task, step=4)["inputs"])
  assert not np.array_equal(a["inputs"], _batch(task, step=3, seed=1)["inputs"])
  assert not np.array_equal(a["inputs"], _batch(task, step=3, split="eval")["inputs"])
  halves = [_batch(task, step=3, process_index=i, process_count=2) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]), a["inputs"])


@pytest.mark.parametrize("power_a", [0.01, 1.0])
def test_mqar_query_slots_follow_the_power_law(power_a):
  # With one pair the chosen slot's distribution is exactly p(x) ~ a * x**(a - 1).
  task = data.MQAR(seq_len=18, num_pairs=1, vocab_size=64, power_a=power_a)
  batch = _batch(task, size=4000)
  slots = (np.argmax(batch["weights"], axis=1) - 2) // 2
  frequency = np.bincount(slots, minlength=task.num_slots) / len(slots)
  np.testing.assert_allclose(frequency, task.slot_probabilities(), atol=0.03)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(seq_len=16, num_pairs=5, vocab_size=64), "num_pairs=5"),
    (dict(seq_len=64, num_pairs=4, vocab_size=64), "vocab_size=64"),
    (dict(seq_len=64, num_pairs=4, vocab_size=128, power_a=0.0), "power_a"),
  ],
)
def test_mqar_rejects_bad_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.MQAR(**kwargs)


def test_passkey_answer_is_the_hidden_key():
  task = data.Passkey(seq_len=48, passkey_len=4, vocab_size=32)
  batch = _batch(task)
  for inputs, targets, weights in zip(
    batch["inputs"], batch["targets"], batch["weights"], strict=True
  ):
    start = int(np.nonzero(inputs == KEY_MARK)[0][0]) + 1
    (labelled,) = np.nonzero(weights)
    assert inputs[labelled[0]] == QUERY_MARK
    np.testing.assert_array_equal(targets[labelled], inputs[start : start + 4])


def test_selective_copy_answers_are_the_data_tokens_in_order():
  task = data.SelectiveCopy(seq_len=40, num_tokens=6, vocab_size=12)
  batch = _batch(task)
  for inputs, targets, weights in zip(
    batch["inputs"], batch["targets"], batch["weights"], strict=True
  ):
    context = inputs[:-6]
    np.testing.assert_array_equal(targets[weights > 0], context[context > COPY_MARK])
    assert np.all(inputs[-6:] == COPY_MARK)
