"""The synthetic shapes task: deterministic, balanced enough, valid pixels and labels."""

import numpy as np
import pytest

from attnjax.data.shapes import CLASSES, Shapes


def test_batches_are_deterministic_and_well_formed():
  task = Shapes(image_size=16, min_extent=5, max_extent=9, patch_size=4)
  batch = task.batch(3, seed=0, global_batch_size=64)
  again = task.batch(3, seed=0, global_batch_size=64)
  for key in batch:
    np.testing.assert_array_equal(batch[key], again[key])
  assert batch["inputs"].shape == (64, 16, 16) and batch["inputs"].dtype == np.int32
  assert batch["inputs"].min() >= 0 and batch["inputs"].max() <= 255
  assert batch["targets"].shape == (64, 1) and set(np.unique(batch["targets"])) <= set(range(4))
  assert len(np.unique(batch["targets"])) == len(CLASSES)
  np.testing.assert_array_equal(batch["weights"], 1.0)
  assert task.seq_len == 16
  other = task.batch(4, seed=0, global_batch_size=64)
  assert not np.array_equal(batch["inputs"], other["inputs"])


def test_the_shape_is_brighter_than_the_background():
  task = Shapes(noise=0.0)
  example = task.example(np.random.default_rng(0))
  assert example["inputs"].max() > example["inputs"].min() + 100


@pytest.mark.parametrize(
  "options, message",
  [(dict(min_extent=20, max_extent=10), "min_extent"), (dict(patch_size=5), "patch_size")],
)
def test_bad_options_raise(options, message):
  with pytest.raises(ValueError, match=message):
    Shapes(**options)
