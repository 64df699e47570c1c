"""AdamW (Loshchilov & Hutter 2019) with linear warmup + cosine decay and global-norm clipping."""

from __future__ import annotations

import jax
import ml_collections
import optax


def make_optimizer(train: ml_collections.ConfigDict):
  """(optax transformation, learning-rate schedule) from the `train` config block.

  Weight decay applies to matrices only (not to norm scales or other vectors).
  """
  peak = train.learning_rate
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=min(train.warmup_steps, train.steps - 1),
    decay_steps=train.steps,
    end_value=peak * train.min_lr_ratio,
  )
  adamw = optax.adamw(
    schedule,
    b1=train.b1,
    b2=train.b2,
    weight_decay=train.weight_decay,
    mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
  )
  clip = optax.clip_by_global_norm(train.grad_clip) if train.grad_clip > 0 else optax.identity()
  return optax.chain(clip, adamw), schedule
