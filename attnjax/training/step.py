"""The jitted steps of an `Experiment`: train (loss, gradients, optimizer update) and eval.

Both are pure functions of the train state `{"params", "opt_state", "step"}` (or its params)
and a global batch; each re-assembles the module from the experiment's `graphdef`.
`evaluate_loss` adds eval steps up over the eval split (used by the loop and by eval.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attnjax.training.build import Experiment


def make_train_step(exp: Experiment):
  """Jitted `(state, batch) -> (state, metrics)`; the input state is donated.

  `metrics` holds `loss`, `accuracy`, `grad_norm`, `lr` (of this step) and, when the model
  sows one, `aux_loss`.
  """

  def step(state, batch):
    def loss_of(params):
      return exp.loss(exp.model(params), batch)

    (loss, sums), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    updates, opt_state = exp.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {
      "loss": loss,
      "accuracy": sums["correct_sum"] / jnp.maximum(sums["weight_sum"], 1.0),
      "grad_norm": optax.tree.norm(grads),
      "lr": exp.schedule(state["step"]),
      **{key: sums[key] for key in ("aux_loss",) if key in sums},
    }
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  return jax.jit(step, donate_argnums=0, out_shardings=(exp.state_shardings, None))


def make_eval_step(exp: Experiment):
  """Jitted `(params, batch) -> metric sums` (`loss_sum`, `correct_sum`, `weight_sum`)."""
  return jax.jit(lambda params, batch: exp.loss(exp.model(params), batch)[1])


def evaluate_loss(exp: Experiment, eval_step, params, source) -> dict[str, float]:
  """Loss, perplexity and accuracy over `eval.num_batches` batches of `source`'s eval split."""
  config = exp.config
  totals = {"loss_sum": 0.0, "correct_sum": 0.0, "weight_sum": 0.0}
  for i in range(config.eval.num_batches):
    batch = exp.batch(source, i, split="eval", batch_size=config.eval.batch_size)
    sums = jax.device_get(eval_step(params, batch))
    for key in totals:
      totals[key] += float(sums[key])
  weight = max(totals["weight_sum"], 1.0)
  loss = totals["loss_sum"] / weight
  return {
    "loss": loss,
    "perplexity": float(np.exp(min(loss, 50.0))),
    "accuracy": totals["correct_sum"] / weight,
  }
