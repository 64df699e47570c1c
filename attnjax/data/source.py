"""Batches as a pure function of (seed, step): the contract every training data source meets.

A source returns the rows of global batch `step` that belong to one process, as numpy arrays
`{"inputs": int32 [rows, seq], "targets": int32 [rows, seq], "weights": float32 [rows, seq]}`
(plus optional `"segment_ids"`). Because a batch depends only on (seed, step), a resumed run
reads exactly the batches an uninterrupted one would, and any number of processes together
read the same global batch.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import numpy as np

SPLIT_SALT = {"train": 0, "eval": 1, "test": 2}


def process_rows(global_batch_size: int, process_index: int, process_count: int) -> range:
  """Global row indices of the batch that process `process_index` of `process_count` loads."""
  if global_batch_size % process_count:
    raise ValueError(
      f"global batch size {global_batch_size} must be divisible by the process count "
      f"{process_count}"
    )
  per_process = global_batch_size // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of example `index` of `split`: independent of batch size and processes."""
  return np.random.default_rng([seed, SPLIT_SALT[split], index])


class ExampleTask(abc.ABC):
  """A synthetic task defined example by example; batches stack `example(rng)` results."""

  seq_len: int

  @abc.abstractmethod
  def example(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One example: `inputs`, `targets` int `[seq_len]`, `weights` float `[seq_len]`."""

  def batch(
    self,
    step: int,
    *,
    seed: int,
    global_batch_size: int,
    split: str = "train",
    process_index: int = 0,
    process_count: int = 1,
  ) -> dict[str, np.ndarray]:
    """Rows of global batch `step` owned by `process_index`, each `[rows, seq_len]`."""
    rows = process_rows(global_batch_size, process_index, process_count)
    examples = [
      self.example(example_rng(seed, split, step * global_batch_size + row)) for row in rows
    ]
    return stack(examples)


def stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  dtypes: dict[str, Callable] = {"weights": np.float32}
  return {
    key: np.stack([e[key] for e in examples]).astype(dtypes.get(key, np.int32))
    for key in examples[0]
  }
