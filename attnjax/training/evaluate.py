"""Evaluators named in `config.eval.evaluators`, run by eval.py on a restored model.

Each takes an `EvalContext` and returns a dict of numbers or lists (curves):
`loss` (loss, perplexity, accuracy on the eval split), `mqar_accuracy`, `passkey` (accuracy
at `eval.passkey_lengths`), `length_extrapolation` (loss by position on sequences
`eval.extrapolation_factor` times the training length).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attnjax import data
from attnjax.training import tasks, trainer

NUM_POSITION_BUCKETS = 32


@dataclasses.dataclass(frozen=True)
class EvalContext:
  config: Any
  setup: trainer.Setup
  params: Any
  mesh: Any


def _accuracy_on(ctx: EvalContext, source) -> dict[str, float]:
  eval_step = trainer.make_eval_step(ctx.config, ctx.setup)
  return trainer.evaluate_loss(ctx.config, ctx.setup, eval_step, ctx.params, source, ctx.mesh)


def eval_loss(ctx: EvalContext) -> dict[str, float]:
  source = tasks.DATASETS[ctx.config.data.kind].make(ctx.config, "eval")
  return _accuracy_on(ctx, source)


def eval_mqar(ctx: EvalContext) -> dict[str, float]:
  return {"accuracy": _accuracy_on(ctx, data.MQAR(**ctx.config.data.mqar))["accuracy"]}


def eval_passkey(ctx: EvalContext) -> dict[str, list]:
  options = dict(ctx.config.data.passkey)
  lengths = list(ctx.config.eval.passkey_lengths)
  accuracy = []
  for seq_len in lengths:
    source = data.Passkey(**{**options, "seq_len": seq_len})
    accuracy.append(_accuracy_on(ctx, source)["accuracy"])
  return {"seq_len": lengths, "accuracy": accuracy}


def eval_length_extrapolation(ctx: EvalContext) -> dict[str, list]:
  """Mean loss in `NUM_POSITION_BUCKETS` position buckets over `factor` x training length."""
  config = ctx.config
  kind = tasks.DATASETS[config.data.kind]
  train_len = kind.make(config).seq_len
  seq_len = train_len * config.eval.extrapolation_factor
  source = kind.make(config, "eval", seq_len=seq_len)

  @jax.jit
  def position_sums(params, batch):
    logits, _ = tasks.lm_forward(nnx.merge(ctx.setup.graphdef, params), batch)
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(token_loss * batch["weights"], 0), jnp.sum(batch["weights"], 0)

  loss_sum, weight_sum = np.zeros(seq_len), np.zeros(seq_len)
  for i in range(config.eval.num_batches):
    batch = trainer.load_batch(
      source, i, config=config, mesh=ctx.mesh, split="eval", batch_size=config.eval.batch_size
    )
    sums = jax.device_get(position_sums(ctx.params, batch))
    loss_sum, weight_sum = loss_sum + sums[0], weight_sum + sums[1]
  edges = np.linspace(0, seq_len, NUM_POSITION_BUCKETS + 1).astype(int)
  positions, losses = [], []
  for lo, hi in zip(edges[:-1], edges[1:], strict=True):
    if weight_sum[lo:hi].sum() > 0:
      positions.append(int((lo + hi) // 2))
      losses.append(float(loss_sum[lo:hi].sum() / weight_sum[lo:hi].sum()))
  return {"train_seq_len": train_len, "position": positions, "loss": losses}


EVALUATORS = {
  "loss": eval_loss,
  "mqar_accuracy": eval_mqar,
  "passkey": eval_passkey,
  "length_extrapolation": eval_length_extrapolation,
}
