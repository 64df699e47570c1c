"""More synthetic recall tasks: passkey retrieval and selective copying.

Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", arXiv 2305.16300): a
`passkey_len`-digit key hidden at a random depth of filler text must be repeated after a
query marker at the end. Selective copying (Gu & Dao 2023, "Mamba", arXiv 2312.00752):
`num_tokens` data tokens scattered among blanks must be emitted in order after the context.
Labels sit on the positions whose next token is an answer, as in next-token prediction.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attnjax.data.source import ExampleTask

# Passkey vocabulary: 0 pad, 1 key marker, 2 query marker, 3..12 digits, 13.. filler.
KEY_MARK, QUERY_MARK, FIRST_DIGIT, FIRST_FILLER = 1, 2, 3, 13


@dataclasses.dataclass(frozen=True)
class Passkey(ExampleTask):
  """`filler.. KEY d1..dn filler.. QUERY d1..dn`; labels predict the digits after QUERY."""

  seq_len: int = 256
  passkey_len: int = 5
  vocab_size: int = 64

  def __post_init__(self):
    if self.vocab_size <= FIRST_FILLER:
      raise ValueError(f"vocab_size must exceed {FIRST_FILLER}, got {self.vocab_size}")
    if self.seq_len < 3 * self.passkey_len + 4:
      raise ValueError(
        f"seq_len={self.seq_len} is too short for passkey_len={self.passkey_len}: needs at "
        f"least {3 * self.passkey_len + 4}"
      )

  def example(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = self.passkey_len
    digits = FIRST_DIGIT + rng.integers(0, 10, n)
    inputs = rng.integers(FIRST_FILLER, self.vocab_size, self.seq_len)
    answer_start = self.seq_len - n  # the last n positions hold the digits after QUERY
    depth = rng.integers(0, answer_start - 2 * n - 2)
    inputs[depth] = KEY_MARK
    inputs[depth + 1 : depth + 1 + n] = digits
    inputs[answer_start - 1] = QUERY_MARK
    inputs[answer_start:] = digits
    targets = np.zeros(self.seq_len, np.int64)
    weights = np.zeros(self.seq_len, np.float32)
    targets[answer_start - 1 : -1], weights[answer_start - 1 : -1] = digits, 1.0
    return {"inputs": inputs, "targets": targets, "weights": weights}


# Selective-copy vocabulary: 0 blank, 1 copy marker, 2.. data tokens.
BLANK, COPY_MARK, FIRST_DATA = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class SelectiveCopy(ExampleTask):
  """`num_tokens` data tokens among blanks, then `num_tokens` COPY markers to fill in order."""

  seq_len: int = 128
  num_tokens: int = 8
  vocab_size: int = 16

  def __post_init__(self):
    if self.vocab_size <= FIRST_DATA:
      raise ValueError(f"vocab_size must exceed {FIRST_DATA}, got {self.vocab_size}")
    if self.seq_len < 2 * self.num_tokens + 1:
      raise ValueError(
        f"seq_len={self.seq_len} must be at least 2 * num_tokens + 1 = {2 * self.num_tokens + 1}"
      )

  def example(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n, context_len = self.num_tokens, self.seq_len - self.num_tokens
    data = rng.integers(FIRST_DATA, self.vocab_size, n)
    inputs = np.full(self.seq_len, BLANK, np.int64)
    inputs[np.sort(rng.choice(context_len, n, replace=False))] = data
    inputs[context_len:] = COPY_MARK
    targets = np.zeros(self.seq_len, np.int64)
    weights = np.zeros(self.seq_len, np.float32)
    targets[context_len:], weights[context_len:] = data, 1.0
    return {"inputs": inputs, "targets": targets, "weights": weights}
