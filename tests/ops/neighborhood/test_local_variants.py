"""HaloNet, MaxViT and BiFormer attention against direct implementations of their definitions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import registry
from attnjax.ops.neighborhood import (
  biformer_attention,
  halo_attention,
  maxvit_attention,
  route_regions,
)
from tests.helpers import assert_close, assert_matches_reference, random_normal, tolerance


def _qkv(seed, spatial, heads=2, kv_heads=1, head_dim=8, dtype=jnp.float32, batch=2):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (
    random_normal(keys[0], (batch, *spatial, heads, head_dim), dtype),
    random_normal(keys[1], (batch, *spatial, kv_heads, head_dim), dtype),
    random_normal(keys[2], (batch, *spatial, kv_heads, head_dim), dtype),
  )


def _softmax_attention(q, k, v, allowed=None):
  """float64 attention of `q [t, h, d]` over `k, v [s, hk, d]`, GQA by head index."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  groups = q.shape[1] // k.shape[1]
  k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
  logits = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1])
  if allowed is not None:
    logits = np.where(allowed[None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("hts,shd->thd", probs, v)


def halo_by_unfolding(q, k, v, block, halo):
  """HaloNet as written in the paper: pad keys by the halo, cut (block + 2 halo)^2 windows."""
  batch, height, width, heads, _ = q.shape
  pad = [(0, 0), (halo, halo), (halo, halo), (0, 0), (0, 0)]
  k_pad, v_pad = np.pad(np.asarray(k), pad), np.pad(np.asarray(v), pad)
  inside = np.pad(np.ones((height, width), bool), halo)  # padded keys are masked, not zeros
  out = np.zeros((*q.shape[:-1], v.shape[-1]))
  span = block + 2 * halo
  for b in range(batch):
    for i in range(0, height, block):
      for j in range(0, width, block):
        queries = np.asarray(q[b, i : i + block, j : j + block]).reshape(-1, heads, q.shape[-1])
        keys = k_pad[b, i : i + span, j : j + span].reshape(span * span, *k.shape[-2:])
        values = v_pad[b, i : i + span, j : j + span].reshape(span * span, *v.shape[-2:])
        allowed = np.broadcast_to(
          inside[i : i + span, j : j + span].reshape(-1), (len(queries), span * span)
        )
        out[b, i : i + block, j : j + block] = _softmax_attention(
          queries, keys, values, allowed
        ).reshape(block, block, heads, -1)
  return out


def maxvit_by_partition(q, k, v, size, partition):
  """MaxViT's reshapes: block = [H/P, P, W/P, P] windows, grid = [G, H/G, G, W/G] grids."""
  batch, height, width = q.shape[:3]

  def windows(x):
    x = np.asarray(x)
    if partition == "block":
      x = x.reshape(batch, height // size, size, width // size, size, *x.shape[-2:])
      return x.transpose(0, 1, 3, 2, 4, 5, 6)  # [b, wy, wx, P, P, h, d]
    x = x.reshape(batch, size, height // size, size, width // size, *x.shape[-2:])
    return x.transpose(0, 2, 4, 1, 3, 5, 6)  # [b, ry, rx, G, G, h, d]

  qw, kw, vw = windows(q), windows(k), windows(v)
  out = np.zeros((*qw.shape[:-1], v.shape[-1]))
  for index in np.ndindex(qw.shape[:3]):
    flat = [x[index].reshape(size * size, *x.shape[-2:]) for x in (qw, kw, vw)]
    out[index] = _softmax_attention(*flat).reshape(size, size, *out.shape[-2:])
  if partition == "block":
    return out.transpose(0, 1, 3, 2, 4, 5, 6).reshape(*q.shape[:-1], -1)
  return out.transpose(0, 3, 1, 4, 2, 5, 6).reshape(*q.shape[:-1], -1)


def biformer_by_loops(q, k, v, region, topk):
  """Region means, top-k routing and attention over the routed regions' tokens, in loops."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, height, width, heads, _ = q.shape
  groups = heads // k.shape[3]
  regions = [(i, j) for i in range(0, height, region) for j in range(0, width, region)]

  def tokens(x, b, r):
    i, j = regions[r]
    return x[b, i : i + region, j : j + region].reshape(region * region, *x.shape[-2:])

  out = np.zeros((*q.shape[:-1], v.shape[-1]))
  for b in range(batch):
    q_mean = np.stack([tokens(q, b, r).mean(0) for r in range(len(regions))])
    k_mean = np.stack([tokens(k, b, r).mean(0) for r in range(len(regions))])
    affinity = np.einsum("ihd,jhd->ij", q_mean, np.repeat(k_mean, groups, axis=1))
    for r, (i, j) in enumerate(regions):
      routed = np.argsort(-affinity[r], kind="stable")[:topk]
      keys = np.concatenate([tokens(k, b, s) for s in routed])
      values = np.concatenate([tokens(v, b, s) for s in routed])
      result = _softmax_attention(tokens(q, b, r), keys, values)
      out[b, i : i + region, j : j + region] = result.reshape(region, region, heads, -1)
  return out, affinity


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_halo_matches_unfolded_definition(impl):
  q, k, v = _qkv(0, (12, 8), heads=4, kv_heads=2)
  run = jax.jit(functools.partial(halo_attention, block_size=4, halo_size=2, impl=impl))
  assert_close(run(q, k, v), halo_by_unfolding(q, k, v, 4, 2), 1e-4, f"halo {impl}")


@pytest.mark.parametrize("partition", ["block", "grid"])
def test_maxvit_matches_partition_definition(partition):
  q, k, v = _qkv(1, (12, 9), heads=2, kv_heads=2)
  q, k, v = (x[:, :9] for x in (q, k, v))  # 9 x 9 image, 3 x 3 windows / grid
  run = functools.partial(maxvit_attention, partition=partition, window_size=3, impl="xla")
  expected = maxvit_by_partition(q, k, v, 3, partition)
  assert_close(jax.jit(run)(q, k, v), expected, 1e-4, f"maxvit {partition}")


def test_maxvit_grid_runs_in_the_kernel():
  q, k, v = _qkv(2, (8, 12), heads=2, kv_heads=1)
  run = functools.partial(maxvit_attention, partition="grid", window_size=(4, 3))
  out = jax.jit(functools.partial(run, impl="pallas_interpret"))(q, k, v)
  assert_close(out, run(q, k, v, impl="reference"), 1e-4, "maxvit grid kernel")


def test_biformer_matches_loops_and_routing():
  q, k, v = _qkv(3, (8, 8), heads=4, kv_heads=2)
  expected, affinity = biformer_by_loops(q, k, v, region=4, topk=2)
  routed = np.asarray(route_regions(q, k, region_size=4, topk=2))
  np.testing.assert_array_equal(
    np.sort(routed[-1], -1), np.sort(np.argsort(-affinity, -1)[:, :2], -1)
  )
  for impl in ("reference", "xla"):
    run = jax.jit(functools.partial(biformer_attention, region_size=4, topk=2, impl=impl))
    assert_close(run(q, k, v), expected, 1e-5, f"biformer {impl}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_biformer_gather_matches_reference_with_gradients(dtype):
  q, k, v = _qkv(4, (6, 9), heads=2, kv_heads=1, dtype=dtype)
  run = functools.partial(biformer_attention, region_size=3, topk=3)
  fast, reference = (functools.partial(run, impl=impl) for impl in ("xla", "reference"))
  assert_matches_reference(fast, reference, (q, k, v), {}, tolerance(dtype), "biformer")


def test_variants_are_registered_with_mixers():
  for name in ("neighborhood", "halo", "maxvit", "biformer"):
    variant = registry.get(name)
    assert variant.family == "neighborhood" and "arXiv" in variant.paper
    assert variant.module.startswith("attnjax.nn.local:")
  assert "pallas" not in registry.get("biformer").impls


@pytest.mark.parametrize(
  "op, options, message",
  [
    (halo_attention, dict(block_size=5), "divide"),
    (halo_attention, dict(block_size=4, halo_size=-1), "halo"),
    (maxvit_attention, dict(window_size=5), "divide"),
    (maxvit_attention, dict(partition="cols"), "partition"),
    (biformer_attention, dict(region_size=3), "divide"),
    (biformer_attention, dict(region_size=4, topk=5), "topk"),
  ],
)
def test_variants_reject_bad_arguments(op, options, message):
  q = jnp.ones((1, 8, 8, 2, 4))
  with pytest.raises(ValueError, match=message):
    op(q, q, q, **options)
