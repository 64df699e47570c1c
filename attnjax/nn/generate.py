"""Autoregressive generation from a `DecoderLM` with its decoding cache.

    tokens = generate(model, prompt, max_new_tokens=32)                      # greedy
    tokens = generate(model, prompt, 32, temperature=0.8, top_p=0.9, rng=jax.random.key(0))

The prompt is prefilled in one `decode` call; each new token is one jitted step on a cache
the step donates (updated in place where the backend allows), so no step recomputes the
prefix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def sample_logits(
  logits: jax.Array,
  key: jax.Array | None,
  *,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
) -> jax.Array:
  """Next tokens int32 `[batch]` from float logits `[batch, vocab]`.

  `temperature` 0: argmax (greedy; `key` unused). Otherwise samples from
  `softmax(logits / temperature)` restricted to the `top_k` most likely tokens and to the
  smallest set whose probability reaches `top_p` (nucleus sampling; the most likely token is
  always kept).
  """
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    before = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    before = before - jax.nn.softmax(sorted_logits, axis=-1)  # mass of the more likely ones
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    logits = (
      jnp.full_like(logits, -jnp.inf)
      .at[jnp.arange(logits.shape[0])[:, None], order]
      .set(sorted_logits)
    )
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(
  model,
  prompt: jax.Array,
  max_new_tokens: int,
  *,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  rng: jax.Array | None = None,
  cache_dtype=None,
  cache_policy=None,
) -> jax.Array:
  """`prompt` int `[batch, p]` followed by `max_new_tokens` generated tokens.

  Args:
    model: a `DecoderLM` whose every layer can decode (`DecoderLM.init_cache`).
    prompt: int `[batch, p]`, p >= 1.
    max_new_tokens: tokens to generate (>= 0).
    temperature, top_k, top_p: see `sample_logits`; temperature 0 is greedy.
    rng: a PRNG key, needed when temperature > 0.
    cache_dtype: dtype of softmax layers' keys and values (None: the model's).
    cache_policy: what softmax layers keep and attend to (`attnjax.nn.StreamingLLM`,
      `attnjax.nn.RecycledAttention`, `attnjax.nn.TidalDecode`; None: every position).

  Returns:
    int32 `[batch, p + max_new_tokens]`.
  """
  prompt = jnp.asarray(prompt)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be int [batch, p] with p >= 1, got shape {prompt.shape}")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got temperature={temperature}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(...)")
  if top_k is not None and not 1 <= top_k <= model.embed.shape[0]:
    raise ValueError(f"top_k must be in [1, vocab={model.embed.shape[0]}], got top_k={top_k}")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got top_p={top_p}")
  if max_new_tokens == 0:
    return prompt.astype(jnp.int32)
  batch, length = prompt.shape
  cache = model.init_cache(batch, length + max_new_tokens, cache_dtype, cache_policy)
  graphdef, params = nnx.split(model)
  keys = jax.random.split(jax.random.key(0) if rng is None else rng, max_new_tokens)

  def step(params, cache, tokens, key):
    logits, cache = nnx.merge(graphdef, params).decode(tokens, cache)
    sampled = sample_logits(logits[:, -1], key, temperature=temperature, top_k=top_k, top_p=top_p)
    return sampled, cache

  step = jax.jit(step, donate_argnums=1)
  token, cache = step(params, cache, prompt, keys[0])
  generated = [token]
  for key in keys[1:]:
    token, cache = step(params, cache, token[:, None], key)
    generated.append(token)
  return jnp.concatenate([prompt.astype(jnp.int32), jnp.stack(generated, axis=1)], axis=1)
