"""Feature maps `phi` of linear attention: `phi(q) phi(k)^T` stands in for `exp(q k^T)`.

Each map takes `x [..., head_dim]` and returns `[..., feature_dim]`; the state of linear
attention is `[batch, heads, feature_dim, value_dim]`, so `feature_dim` is its key_dim.
`linear_attention` applies a map to the scaled queries and to the keys: `phi(scale * q)`,
`phi(k)`.

| name       | phi(x)                                   | feature_dim          |
|------------|------------------------------------------|----------------------|
| `identity` | x                                        | d                    |
| `elu+1`    | elu(x) + 1 (Katharopoulos et al. 2020)   | d                    |
| `relu`     | max(x, 0)                                | d                    |
| `softmax`  | softmax(x) over the feature axis         | d                    |
| `silu`     | x * sigmoid(x) (swish, TransNormerLLM)   | d                    |
| `taylor`   | [1, x, vec(x x^T) / sqrt(2)] (BASED)     | 1 + d + d^2          |

`taylor` is the second-order Taylor expansion of exp used by BASED (Arora et al. 2024,
"Simple linear attention language models balance the recall-throughput tradeoff", Sec. 4):
`phi(x) . phi(y) = 1 + x.y + (x.y)^2 / 2`, so with the query scaled first,
`phi(scale * q) . phi(k) = 1 + s + s^2 / 2` with `s = scale * q.k`, the expansion of
`exp(q.k / sqrt(d))` for `scale = d ** -0.5`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

FeatureMap = Callable[[jax.Array], jax.Array]


def identity(x: jax.Array) -> jax.Array:
  """`x [..., d] -> [..., d]` unchanged."""
  return x


def elu_plus_one(x: jax.Array) -> jax.Array:
  """`elu(x) + 1 [..., d]`: positive, so normalized linear attention has a positive denominator."""
  return jax.nn.elu(x) + 1.0


def relu(x: jax.Array) -> jax.Array:
  """`max(x, 0) [..., d]`."""
  return jax.nn.relu(x)


def softmax(x: jax.Array) -> jax.Array:
  """`softmax(x) [..., d]` over the feature axis (positive, sums to one)."""
  return jax.nn.softmax(x, axis=-1)


def silu(x: jax.Array) -> jax.Array:
  """`x * sigmoid(x) [..., d]` (swish), the query and key map of TransNormerLLM."""
  return jax.nn.silu(x)


def taylor(x: jax.Array) -> jax.Array:
  """`[1, x, vec(x x^T) / sqrt(2)] [..., 1 + d + d^2]`, the 2nd-order Taylor map of exp."""
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], x.shape[-1] ** 2)
  return jnp.concatenate([jnp.ones_like(x[..., :1]), x, outer * (0.5**0.5)], axis=-1)


FEATURE_MAPS: dict[str, FeatureMap] = {
  "identity": identity,
  "elu+1": elu_plus_one,
  "relu": relu,
  "softmax": softmax,
  "silu": silu,
  "taylor": taylor,
}


def resolve(feature_map: str | FeatureMap | None) -> FeatureMap:
  """The feature map named `feature_map` (None: identity), or `feature_map` if callable."""
  if feature_map is None:
    return identity
  if callable(feature_map):
    return feature_map
  if feature_map not in FEATURE_MAPS:
    raise ValueError(
      f"feature_map must be a callable or one of {sorted(FEATURE_MAPS)}, got {feature_map!r}"
    )
  return FEATURE_MAPS[feature_map]


def feature_dim(feature_map: str | FeatureMap | None, head_dim: int) -> int:
  """Output size of `feature_map` on `head_dim` inputs (the state's key_dim)."""
  phi = resolve(feature_map)
  return jax.eval_shape(phi, jax.ShapeDtypeStruct((head_dim,), jnp.float32)).shape[-1]
