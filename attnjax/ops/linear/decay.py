"""Log-space decay of linear attention: the accepted shapes, and per-head schedules.

The state decays as `S_t = diag(a_t) S_{t-1} + ...` with `a_t = exp(log_decay_t)` in (0, 1].
Working in log space keeps products of many decays exact: chunked forms only ever take `exp`
of a non-positive difference of cumulative sums within one chunk (chunk-relative decay), so
T = 65,536 with strong decay neither overflows nor loses the nearby tokens.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def broadcast_log_decay(
  log_decay: jax.Array | None, *, batch: int, seq: int, heads: int, key_dim: int
) -> jax.Array:
  """`log_decay` in any accepted shape -> float32 `[batch, seq, heads, 1 | key_dim]`.

  Accepted: None (no decay), `[heads]` (a constant per head), `[batch, seq, heads]` (a
  data-dependent scalar per head and token), `[batch, seq, heads, key_dim]` (a data-dependent
  vector over the state's key_dim, as in GLA). `heads` are the query heads. Values must be
  <= 0 (decays in (0, 1]); they are not checked, since they may be traced.
  """
  if log_decay is None:
    return jnp.zeros((batch, seq, heads, 1), jnp.float32)
  log_decay = jnp.asarray(log_decay)
  accepted = {
    1: (heads,),
    3: (batch, seq, heads),
    4: (batch, seq, heads, key_dim),
  }
  if accepted.get(log_decay.ndim) != log_decay.shape:
    raise ValueError(
      f"log_decay must be [heads] = {accepted[1]}, [batch, seq, heads] = {accepted[3]} or "
      f"[batch, seq, heads, key_dim] = {accepted[4]} (key_dim: the feature map's output "
      f"size), got shape {log_decay.shape}"
    )
  log_decay = log_decay.astype(jnp.float32)
  if log_decay.ndim == 1:
    return jnp.broadcast_to(log_decay[None, None, :, None], (batch, seq, heads, 1))
  if log_decay.ndim == 3:
    return log_decay[..., None]
  return log_decay


def alibi_slopes(heads: int) -> np.ndarray:
  """ALiBi's geometric slopes `2^(-8 i / heads)`, i = 1..heads (Press et al. 2022).

  For a head count that is not a power of two, the slopes of the next-lower power of two are
  completed by every other slope of the next-higher one, as ALiBi does.
  """

  def power_of_two(n):
    return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

  if heads & (heads - 1) == 0:
    return np.asarray(power_of_two(heads), np.float32)
  lower = 2 ** math.floor(math.log2(heads))
  extra = power_of_two(2 * lower)[0::2][: heads - lower]
  return np.asarray(power_of_two(lower) + extra, np.float32)


def lightning_log_decay(heads: int, layer: int = 0, num_layers: int = 1) -> np.ndarray:
  """`[heads]` log decays of TransNormerLLM / Lightning Attention: `-s_h * r_layer`.

  Head h decays at ALiBi slope `s_h = 2^(-8 h / H)` (`alibi_slopes`); deeper layers decay
  less, `r = 1 - layer / (L - 1) + 1e-5` (the floor keeps the last layer forgetting a
  little), the schedule of the TransNormerLLM authors' code (Qin et al. 2023, 2024). A
  one-layer model (`L = 1`) uses `r = 1 + 1e-5`.
  """
  if not 0 <= layer < num_layers:
    raise ValueError(f"layer must be in [0, num_layers={num_layers}), got layer={layer}")
  depth_ratio = 1.0 - layer / max(num_layers - 1, 1) + 1e-5
  return (-alibi_slopes(heads) * depth_ratio).astype(np.float32)


def retention_log_decay(heads: int) -> np.ndarray:
  """`[heads]` log decays of RetNet's multi-scale retention: `log(1 - 2^(-5 - h))`."""
  return np.log1p(-(2.0 ** (-5.0 - np.arange(heads)))).astype(np.float32)
