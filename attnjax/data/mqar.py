"""MQAR, multi-query associative recall (Arora et al. 2023, "Zoology", arXiv 2312.04927).

An example of length L holds N key-value pairs `k1 v1 ... kN vN` (keys from [1, V/2), values
from [V/2, V), both drawn without replacement), then L - 2N tokens of query region split into
two-token slots; N slots are chosen without replacement with probability proportional to
`a * x**(a - 1)` (slot x = 1, 2, ...) and hold a key, whose value is the label of that
position. Other positions carry random tokens and no label. See /work/shared/MQAR.md.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attnjax.data.source import ExampleTask


@dataclasses.dataclass(frozen=True)
class MQAR(ExampleTask):
  """MQAR with sequence length `seq_len`, `num_pairs` pairs, `vocab_size`, power `power_a`."""

  seq_len: int = 64
  num_pairs: int = 4
  vocab_size: int = 8192
  power_a: float = 0.01

  def __post_init__(self):
    if self.num_pairs < 1 or 4 * self.num_pairs > self.seq_len:
      raise ValueError(
        f"num_pairs={self.num_pairs} must be in [1, seq_len / 4 = {self.seq_len // 4}]: the "
        "context takes 2 * num_pairs tokens and every query a two-token slot"
      )
    if self.vocab_size <= self.seq_len or self.vocab_size // 2 - 1 < self.num_pairs:
      raise ValueError(
        f"vocab_size={self.vocab_size} must exceed seq_len={self.seq_len} and give at least "
        f"num_pairs={self.num_pairs} keys in [1, vocab_size / 2)"
      )
    if not self.power_a > 0:
      raise ValueError(f"power_a must be positive, got power_a={self.power_a}")

  @property
  def num_slots(self) -> int:
    return (self.seq_len - 2 * self.num_pairs) // 2

  def slot_probabilities(self) -> np.ndarray:
    """`[num_slots]`: p(x) proportional to a * x**(a - 1), x = 1 ... num_slots."""
    x = np.arange(1, self.num_slots + 1, dtype=np.float64)
    p = self.power_a * x ** (self.power_a - 1)
    return p / p.sum()

  def example(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    half, n = self.vocab_size // 2, self.num_pairs
    keys = 1 + rng.choice(half - 1, n, replace=False)
    values = half + rng.choice(self.vocab_size - half, n, replace=False)
    inputs = rng.integers(0, self.vocab_size, self.seq_len)
    inputs[0 : 2 * n : 2], inputs[1 : 2 * n : 2] = keys, values
    slots = rng.choice(self.num_slots, n, replace=False, p=self.slot_probabilities())
    query_positions = 2 * n + 2 * slots
    order = rng.permutation(n)  # which pair each chosen slot queries
    inputs[query_positions] = keys[order]
    targets = np.zeros(self.seq_len, np.int64)
    weights = np.zeros(self.seq_len, np.float32)
    targets[query_positions], weights[query_positions] = values[order], 1.0
    return {"inputs": inputs, "targets": targets, "weights": weights}
