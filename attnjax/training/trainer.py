"""The pure pieces of training: sharded state init, jitted train/eval steps, batch placement.

The train state is a plain pytree `{"params", "opt_state", "step"}`; the model's structure
(`graphdef`) stays outside, and the step re-assembles the module with `nnx.merge`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from attnjax.training import sharding, tasks


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything derived from the config and mesh before the first step."""

  graphdef: Any
  abstract_state: Any  # ShapeDtypeStructs carrying the target shardings
  state_shardings: Any
  init: Any  # () -> sharded train state
  tx: optax.GradientTransformation
  schedule: Any


def setup(config: ml_collections.ConfigDict, mesh, tx, schedule) -> Setup:
  """Builds the model abstractly (no memory), derives shardings from logical axis names.

  The model is built for `mesh`: with `mesh.shape["seq"] > 1` its mixers split the sequence
  over that axis (`tasks.seq_parallel`), and a layer that cannot be split raises here.
  """
  model_kind = tasks.MODELS[config.model.kind]

  def init_params():
    return nnx.split(model_kind.build(config, nnx.Rngs(config.seed), mesh))

  graphdef, abstract_params = jax.eval_shape(init_params)
  logical_specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
  abstract_params = nnx.to_pure_dict(abstract_params)
  param_shardings = sharding.tree_shardings(logical_specs, config.mesh.rules, mesh)
  sharding.check_divisible(abstract_params, param_shardings)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_shardings = optax.tree_map_params(
    tx,
    lambda _, s: s,
    abstract_opt,
    param_shardings,
    transform_non_params=lambda _: replicated,
  )
  state_shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated}
  abstract = {
    "params": abstract_params,
    "opt_state": abstract_opt,
    "step": jnp.zeros((), jnp.int32),
  }
  abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=s),
    abstract,
    state_shardings,
  )

  def init():
    params = nnx.to_pure_dict(init_params()[1])
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  return Setup(
    graphdef=graphdef,
    abstract_state=abstract_state,
    state_shardings=state_shardings,
    init=jax.jit(init, out_shardings=state_shardings),
    tx=tx,
    schedule=schedule,
  )


def make_train_step(config: ml_collections.ConfigDict, s: Setup):
  """Jitted `(state, batch) -> (state, metrics)`; the input state is donated."""
  loss_fn = tasks.MODELS[config.model.kind].loss

  def step(state, batch):
    def loss_of(params):
      return loss_fn(nnx.merge(s.graphdef, params), batch)

    (loss, sums), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    updates, opt_state = s.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {
      "loss": loss,
      "accuracy": sums["correct_sum"] / jnp.maximum(sums["weight_sum"], 1.0),
      "grad_norm": optax.tree.norm(grads),
      "lr": s.schedule(state["step"]),
      **{key: sums[key] for key in ("aux_loss",) if key in sums},
    }
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  return jax.jit(step, donate_argnums=0, out_shardings=(s.state_shardings, None))


def make_eval_step(config: ml_collections.ConfigDict, s: Setup):
  """Jitted `(params, batch) -> metric sums` (`loss_sum`, `correct_sum`, `weight_sum`)."""
  loss_fn = tasks.MODELS[config.model.kind].loss
  return jax.jit(lambda params, batch: loss_fn(nnx.merge(s.graphdef, params), batch)[1])


def global_batch(local: dict[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
  """Process-local rows -> global arrays sharded over the batch axes of `mesh`."""
  out = {}
  for key, rows in local.items():
    target = sharding.batch_sharding(mesh, rules, rows.ndim)
    global_shape = (rows.shape[0] * jax.process_count(), *rows.shape[1:])
    out[key] = jax.make_array_from_process_local_data(target, rows, global_shape)
  return out


def load_batch(source, step: int, *, config, mesh, split: str, batch_size: int):
  """Global batch `step` of `split` from `source`, this process loading only its rows."""
  local = source.batch(
    step,
    seed=config.seed,
    global_batch_size=batch_size,
    split=split,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  return global_batch(local, mesh, config.mesh.rules)


def evaluate_loss(config, s: Setup, eval_step, params, source, mesh) -> dict[str, float]:
  """Loss, perplexity and accuracy over `eval.num_batches` batches of the eval split."""
  totals = {"loss_sum": 0.0, "correct_sum": 0.0, "weight_sum": 0.0}
  for i in range(config.eval.num_batches):
    batch = load_batch(
      source, i, config=config, mesh=mesh, split="eval", batch_size=config.eval.batch_size
    )
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
