"""Pieces shared by the delta-rule state-pass kernels (`tpu.py`, `gpu.py`): the operands'
contract and its checks."""

from __future__ import annotations


def check_shapes(query_state, w, u, k_end, end_decay, initial_state) -> None:
  """Raises ValueError naming the operand whose shape breaks the kernels' contract:
  `query_state`, `w`, `k_end [batch, heads, chunks, C, key_dim]`, `u [batch, heads, chunks, C,
  value_dim]`, `end_decay [batch, heads, chunks]`, `initial_state [batch, heads, key_dim,
  value_dim]`."""
  if query_state.ndim != 5:
    raise ValueError(
      f"query_state must be [batch, heads, chunks, C, key_dim], got shape {query_state.shape}"
    )
  keys = query_state.shape
  for name, x in (("w", w), ("k_end", k_end)):
    if x.shape != keys:
      raise ValueError(f"{name} must have query_state's shape {keys}, got shape {x.shape}")
  if u.ndim != 5 or u.shape[:4] != keys[:4]:
    raise ValueError(f"u must be {keys[:4]} + (value_dim,), got shape {u.shape}")
  if end_decay.shape != keys[:3]:
    raise ValueError(
      f"end_decay must be [batch, heads, chunks] = {keys[:3]}, got {end_decay.shape}"
    )
  state_shape = (*keys[:2], keys[4], u.shape[4])
  if initial_state.shape != state_shape:
    raise ValueError(
      f"initial_state must be [batch, heads, key_dim, value_dim] = {state_shape}, got shape "
      f"{initial_state.shape}"
    )
