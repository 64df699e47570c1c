"""Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
Factuality", arXiv 2404.15574).

While a model copies a needle from its context, a retrieval head's most attended key at each
answer step is the context position of the token being emitted. The retrieval score of a
head is the fraction of answer steps at which that holds. Here answers are teacher-forced:
the query row of an answer step is the position whose next-token prediction is the copied
token, and `copy_batch` builds, from the synthetic recall tasks, a batch together with the
query and source position of every copied token.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from attnjax.data import MQAR, Passkey, SelectiveCopy
from attnjax.data.recall import BLANK, KEY_MARK


def _passkey_sources(inputs: np.ndarray, num_answers: int) -> np.ndarray:
  key_mark = np.argmax(inputs == KEY_MARK, axis=1)  # the needle follows the key marker
  return key_mark[:, None] + 1 + np.arange(num_answers)


def _selective_copy_sources(task: SelectiveCopy, inputs: np.ndarray) -> np.ndarray:
  context = inputs[:, : task.seq_len - task.num_tokens]
  # The data tokens are copied in context order; `nonzero` lists them row by row in order.
  positions = np.nonzero(context != BLANK)[1]
  return positions.reshape(inputs.shape[0], task.num_tokens)


def _mqar_sources(task: MQAR, inputs: np.ndarray, queries: np.ndarray) -> np.ndarray:
  keys = inputs[:, 0 : 2 * task.num_pairs : 2]  # the value of key i sits at 2 i + 1
  queried = np.take_along_axis(inputs, queries, axis=1)
  pair = np.argmax(queried[:, :, None] == keys[:, None, :], axis=2)
  return 2 * pair + 1


def copy_batch(
  task: Passkey | SelectiveCopy | MQAR,
  *,
  batch_size: int,
  seed: int = 0,
  step: int = 0,
  split: str = "eval",
) -> dict[str, np.ndarray]:
  """Batch `step` of `task` with the positions of every copied token.

  Returns the task's batch (`inputs`, `targets`, `weights` `[batch, seq]`) plus int
  `query_positions` and `source_positions` `[batch, answers]`: at query position `t` the
  model must predict the token at source position `s` (`targets[t] == inputs[s]`).
  """
  if not isinstance(task, Passkey | SelectiveCopy | MQAR):
    raise ValueError(f"task must be a Passkey, SelectiveCopy or MQAR task, got {task!r}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got batch_size={batch_size}")
  batch = task.batch(step, seed=seed, global_batch_size=batch_size, split=split)
  inputs = batch["inputs"]
  positions = np.nonzero(batch["weights"] > 0)[1]
  queries = positions.reshape(batch_size, -1)  # every example has the same number of answers
  if isinstance(task, Passkey):
    sources = _passkey_sources(inputs, queries.shape[1])
  elif isinstance(task, SelectiveCopy):
    sources = _selective_copy_sources(task, inputs)
  else:
    sources = _mqar_sources(task, inputs, queries)
  return {**batch, "query_positions": queries, "source_positions": sources}


def retrieval_scores(
  maps: Mapping[int, jax.Array], query_positions, source_positions
) -> dict[int, np.ndarray]:
  """Per layer, float64 `[heads]`: how often a head's most attended key is the copy source.

  Args:
    maps: `{layer: [batch, heads, q_len, kv_len]}` from `attention_maps`.
    query_positions, source_positions: int `[batch, answers]`, as `copy_batch` returns them.
  """
  queries, sources = np.asarray(query_positions), np.asarray(source_positions)
  if queries.ndim != 2 or queries.shape != sources.shape:
    raise ValueError(
      f"query_positions and source_positions must both be [batch, answers], got "
      f"{queries.shape} and {sources.shape}"
    )
  if not maps:
    raise ValueError("maps must hold at least one layer, got an empty mapping")
  scores = {}
  for layer, weights in maps.items():
    weights = np.asarray(weights)
    if weights.ndim != 4 or weights.shape[0] != queries.shape[0]:
      raise ValueError(
        f"maps[{layer}] must be [batch={queries.shape[0]}, heads, q_len, kv_len], got shape "
        f"{weights.shape}"
      )
    if queries.min() < 0 or queries.max() >= weights.shape[2]:
      raise ValueError(f"query_positions must lie in [0, q_len={weights.shape[2]})")
    rows = np.take_along_axis(weights, queries[:, None, :, None], axis=2)  # [b, h, answers, k]
    top = np.argmax(rows, axis=-1)
    scores[layer] = (top == sources[:, None, :]).mean(axis=(0, 2))
  return scores
