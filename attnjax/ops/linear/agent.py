"""Agent attention (Han et al. 2024, "Agent Attention: On the Integration of Softmax and
Linear Attention", ECCV): `n` agent tokens mediate between queries and keys.

    agents  A = pool(q)                        [b, n, h, d]   (mean over n equal spans of q)
    agent aggregation  V_A = softmax(A K^T * scale) V         [b, n, h, dv]
    agent broadcast    O   = softmax(Q A^T * scale) V_A       [b, t, h, dv]

Cost O(t n) instead of O(t^2). Bidirectional only (the paper targets vision encoders). The
paper's agent bias and depthwise-convolution branch on V are not included.
Both softmax steps are `attnjax.ops.dot_product_attention`, so `impl=` selects theirs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.ops.common import check_qkv
from attnjax.ops.softmax import dot_product_attention


def pooling_matrix(seq: int, num_agents: int) -> np.ndarray:
  """`[num_agents, seq]` averaging weights: agent a covers positions [a t / n, (a + 1) t / n)."""
  if not 1 <= num_agents <= seq:
    raise ValueError(f"num_agents must be in [1, seq={seq}], got num_agents={num_agents}")
  edges = (np.arange(num_agents + 1) * seq) // num_agents
  positions = np.arange(seq)
  inside = (positions >= edges[:-1, None]) & (positions < edges[1:, None])
  return (inside / inside.sum(axis=1, keepdims=True)).astype(np.float32)


def agent_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  num_agents: int = 16,
  scale: float | None = None,
  impl: str = "auto",
) -> jax.Array:
  """`q [b, t, h, d]`, `k [b, t, hk, d]`, `v [b, t, hk, dv]` -> `[b, t, h, dv]`."""
  shape = check_qkv(q, k, v, same_length=True)
  pool = jnp.asarray(pooling_matrix(shape.q_len, min(num_agents, shape.q_len)))
  agents = jnp.einsum("nt,bthd->bnhd", pool, q.astype(jnp.float32)).astype(q.dtype)
  agent_values = dot_product_attention(agents, k, v, scale=scale, impl=impl)
  return dot_product_attention(q, agents, agent_values, scale=scale, impl=impl)
