"""Attention-sink metrics (Gu et al. 2024, "When Attention Sink Emerges in Language Models:
An Empirical View", arXiv 2410.10781).

Gu et al. measure, per layer l and head h, the mean attention a head's queries put on the
first token, `alpha^{l,h} = mean_t A^{l,h}[t, 0]`, call a head a sink head when it exceeds
a threshold (0.3), and report the fraction of sink heads over all layers and heads
(`Sink_1^eps`). `sink_mass` generalizes the first token to the first `num_sink_tokens`;
`learned_sink_mass` measures what a learned sink (variant `sinks`) absorbs instead.

Maps come from `attnjax.analysis.attention_maps`: `{layer: [batch, heads, q, k]}`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

# Gu et al.'s threshold on the first-token share for counting a head as a sink head.
SINK_THRESHOLD = 0.3


def _check_maps(maps: Mapping[int, jax.Array]) -> None:
  if not maps:
    raise ValueError("maps must hold at least one layer, got an empty mapping")
  for layer, weights in maps.items():
    if np.ndim(weights) != 4:
      raise ValueError(
        f"maps[{layer}] must be [batch, heads, q_len, kv_len], got shape {np.shape(weights)}"
      )


def _query_rows(weights: np.ndarray, skip_queries: int) -> np.ndarray:
  if not 0 <= skip_queries < weights.shape[2]:
    raise ValueError(
      f"skip_queries must be in [0, q_len={weights.shape[2]}), got skip_queries={skip_queries}"
    )
  return weights[:, :, skip_queries:]


def sink_mass(
  maps: Mapping[int, jax.Array], *, num_sink_tokens: int = 1, skip_queries: int | None = None
) -> dict[int, np.ndarray]:
  """Per layer, float64 `[heads]`: mean over batch and query rows of the weight on the first
  `num_sink_tokens` keys.

  `skip_queries` (default `num_sink_tokens`) leaves out the first query rows, which under a
  causal mask see only the sink tokens and would count a trivial 1.
  """
  _check_maps(maps)
  skip = num_sink_tokens if skip_queries is None else skip_queries
  out = {}
  for layer, weights in maps.items():
    weights = np.asarray(weights, np.float64)
    if not 1 <= num_sink_tokens <= weights.shape[3]:
      raise ValueError(
        f"num_sink_tokens must be in [1, kv_len={weights.shape[3]}], got {num_sink_tokens}"
      )
    rows = _query_rows(weights, skip)[..., :num_sink_tokens].sum(-1)
    out[layer] = rows.mean(axis=(0, 2))
  return out


def learned_sink_mass(
  maps: Mapping[int, jax.Array], *, skip_queries: int = 0
) -> dict[int, np.ndarray]:
  """Per layer, float64 `[heads]`: mean over batch and query rows of `1 - row sum`.

  For `sinks` layers this is the probability taken by the learned sink logit and sink
  tokens; for other softmax-family layers it is 0. Meaningless for unnormalized linear maps.
  """
  _check_maps(maps)
  out = {}
  for layer, weights in maps.items():
    rows = _query_rows(np.asarray(weights, np.float64), skip_queries)
    out[layer] = (1.0 - rows.sum(-1)).mean(axis=(0, 2))
  return out


def sink_heads(
  masses: Mapping[int, np.ndarray], threshold: float = SINK_THRESHOLD
) -> dict[int, np.ndarray]:
  """Per layer, bool `[heads]`: the heads whose sink mass exceeds `threshold`."""
  if not masses:
    raise ValueError("masses must hold at least one layer, got an empty mapping")
  return {layer: np.asarray(mass) > threshold for layer, mass in masses.items()}


def sink_fraction(masses: Mapping[int, np.ndarray], threshold: float = SINK_THRESHOLD) -> float:
  """The fraction of all heads (over all layers) that are sink heads (Gu et al.'s Sink^eps)."""
  flags = np.concatenate([np.ravel(f) for f in sink_heads(masses, threshold).values()])
  return float(flags.mean())
