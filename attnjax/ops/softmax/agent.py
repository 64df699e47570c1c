"""Agent attention (Han et al. 2024, "Agent Attention: On the Integration of Softmax and
Linear Attention", ECCV, arXiv 2312.08874, Sec. 3): `n` agent tokens mediate between queries
and keys, two softmax attentions at cost O(t n) instead of O(t^2).

    agents             A   = pool(Q)                               [b, n, h, d]
    agent aggregation  V_A = softmax(scale * A K^T) V              [b, n, h, dv]
    agent broadcast    O   = softmax(scale * Q A^T) V_A            [b, t, h, dv]

`pool` averages `n` spans of the sequence as PyTorch's adaptive average pooling does (span a
covers positions `floor(a t / n)` to `ceil((a + 1) t / n) - 1`), the pooling of the authors'
code over a 1-D sequence. Bidirectional only (the paper targets vision encoders). The paper's
learned agent biases and depthwise-convolution term on V are parameters of its layer and are
not part of this op. Both softmax steps are `attnjax.ops.dot_product_attention`, so `impl=`
selects theirs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import registry
from attnjax.ops.qkv import check_qkv
from attnjax.ops.softmax import api as softmax_api
from attnjax.ops.softmax import dot_product_attention


def pooling_matrix(seq: int, num_agents: int) -> np.ndarray:
  """`[num_agents, seq]` averaging weights of adaptive average pooling to `num_agents`."""
  if not 1 <= num_agents <= seq:
    raise ValueError(f"num_agents must be in [1, seq={seq}], got num_agents={num_agents}")
  agents = np.arange(num_agents)
  starts = (agents * seq) // num_agents
  ends = -((-(agents + 1) * seq) // num_agents)  # ceil((a + 1) t / n)
  positions = np.arange(seq)
  inside = (positions >= starts[:, None]) & (positions < ends[:, None])
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
  """Agent attention over `[batch, seq, heads, dim]` (see the module docstring).

  Args:
    q: `[batch, seq, heads, head_dim]`.
    k: `[batch, seq, kv_heads, head_dim]`; `heads % kv_heads == 0` (GQA by shape).
    v: `[batch, seq, kv_heads, value_dim]`.
    num_agents: agent tokens `n` (at most `seq`: shorter sequences use `seq` agents).
    scale: of both softmax logits; None means `head_dim ** -0.5`.
    impl: the implementation of both `dot_product_attention` calls.

  Returns:
    `[batch, seq, heads, value_dim]` in q's dtype.
  """
  shape = check_qkv(q, k, v, same_length=True)
  pool = jnp.asarray(pooling_matrix(shape.q_len, min(num_agents, shape.q_len)))
  agents = jnp.einsum("nt,bthd->bnhd", pool, q.astype(jnp.float32)).astype(q.dtype)
  agent_values = dot_product_attention(agents, k, v, scale=scale, impl=impl)
  return dot_product_attention(q, agents, agent_values, scale=scale, impl=impl)


registry.register(
  "agent",
  agent_attention,
  family="softmax",
  paper="Han et al. 2024, Agent Attention (ECCV, arXiv 2312.08874)",
  description="softmax through pooled agent tokens (bidirectional)",
  capabilities=registry.Capabilities(causal=False, bidirectional=True),
  impls=tuple(softmax_api.IMPLS),
  module="attnjax.nn.linear:AgentAttention",
  example=lambda key, **sizes: (registry.random_qkv(key, **sizes), {"num_agents": 4}),
)
