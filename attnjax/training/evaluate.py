"""Evaluators named in `config.eval.evaluators`, run by eval.py on a restored model.

Each takes the run's `Experiment` and the restored parameters and returns a dict of numbers or
lists (curves): `loss` (loss, perplexity, accuracy on the eval split), `mqar_accuracy`,
`passkey` (accuracy at `eval.passkey_lengths`), `passkey_generation` (the same passkeys
retrieved by greedy generation from the decoding cache), `length_extrapolation` (loss by position on
sequences `eval.extrapolation_factor` times the training length), `cache_policies` (the same
streams decoded from the cache with every position, a recent window, or StreamingLLM's sinks
plus a window).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attnjax import data
from attnjax.nn import StreamingLLM, generate
from attnjax.training import build
from attnjax.training.step import evaluate_loss, make_eval_step

NUM_POSITION_BUCKETS = 32
# StreamingLLM's default: four attention sinks (Xiao et al. 2024, Sec. 3.2).
SINK_TOKENS = 4
DECODE_CHUNK = 64  # tokens per decode call of `cache_policies`


def _accuracy_on(exp: build.Experiment, params, source) -> dict[str, float]:
  return evaluate_loss(exp, make_eval_step(exp), params, source)


def eval_loss(exp: build.Experiment, params) -> dict[str, float]:
  return _accuracy_on(exp, params, exp.data("eval"))


def eval_mqar(exp: build.Experiment, params) -> dict[str, float]:
  return {"accuracy": _accuracy_on(exp, params, data.MQAR(**exp.config.data.mqar))["accuracy"]}


def eval_passkey(exp: build.Experiment, params) -> dict[str, list]:
  options = dict(exp.config.data.passkey)
  lengths = list(exp.config.eval.passkey_lengths)
  accuracy = []
  for seq_len in lengths:
    source = data.Passkey(**{**options, "seq_len": seq_len})
    accuracy.append(_accuracy_on(exp, params, source)["accuracy"])
  return {"seq_len": lengths, "accuracy": accuracy}


def passkey_answers(model, inputs: np.ndarray, digits: int) -> np.ndarray:
  """The `digits` tokens `model` generates greedily after each passkey prompt.

  `inputs` int `[batch, seq]` are passkey sequences (`data.Passkey`); the prompt is all but
  their last `digits` tokens (it ends with the QUERY mark).
  """
  out = generate(model, jnp.asarray(inputs[:, :-digits]), digits)
  return np.asarray(out[:, -digits:])


def eval_passkey_generation(exp: build.Experiment, params) -> dict[str, list]:
  """Passkeys retrieved by greedy generation from the decoding cache, at each length.

  The prompt ends with the QUERY mark; the model generates `passkey_len` digits. `accuracy`
  is the fraction of sequences whose digits all match (equal to teacher-forced argmax
  exact match, since greedy decoding first errs where teacher forcing does), `digit_accuracy`
  the fraction of digits at their place.
  """
  options = dict(exp.config.data.passkey)
  digits = options["passkey_len"]
  lengths = list(exp.config.eval.passkey_lengths)
  model = exp.model(params)
  exact, per_digit = [], []
  for seq_len in lengths:
    source = data.Passkey(**{**options, "seq_len": seq_len})
    hits, digit_hits, count = 0, 0, 0
    for i in range(exp.config.eval.num_batches):
      batch = exp.batch(source, i, split="eval", batch_size=exp.config.eval.batch_size)
      inputs = np.asarray(jax.device_get(batch["inputs"]))
      right = passkey_answers(model, inputs, digits) == inputs[:, -digits:]
      hits, digit_hits, count = (
        hits + right.all(1).sum(),
        digit_hits + right.sum(),
        count + len(right),
      )
    exact.append(float(hits / count))
    per_digit.append(float(digit_hits / (count * digits)))
  return {"seq_len": lengths, "accuracy": exact, "digit_accuracy": per_digit}


def eval_length_extrapolation(exp: build.Experiment, params) -> dict[str, list]:
  """Mean loss in `NUM_POSITION_BUCKETS` position buckets over `factor` x training length."""
  config = exp.config
  train_len = exp.data().seq_len
  seq_len = train_len * config.eval.extrapolation_factor
  source = exp.data("eval", seq_len=seq_len)

  @jax.jit
  def position_sums(params, batch):
    logits, _ = build.lm_forward(exp.model(params), batch)
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(token_loss * batch["weights"], 0), jnp.sum(batch["weights"], 0)

  loss_sum, weight_sum = np.zeros(seq_len), np.zeros(seq_len)
  for i in range(config.eval.num_batches):
    batch = exp.batch(source, i, split="eval", batch_size=config.eval.batch_size)
    sums = jax.device_get(position_sums(params, batch))
    loss_sum, weight_sum = loss_sum + sums[0], weight_sum + sums[1]
  positions, losses = _buckets(loss_sum, weight_sum)
  return {"train_seq_len": train_len, "position": positions, "loss": losses}


def _buckets(loss_sum: np.ndarray, weight_sum: np.ndarray) -> tuple[list, list]:
  """(bucket centers, mean loss per bucket) over `NUM_POSITION_BUCKETS` position buckets."""
  edges = np.linspace(0, len(loss_sum), NUM_POSITION_BUCKETS + 1).astype(int)
  positions, losses = [], []
  for lo, hi in zip(edges[:-1], edges[1:], strict=True):
    if weight_sum[lo:hi].sum() > 0:
      positions.append(int((lo + hi) // 2))
      losses.append(float(loss_sum[lo:hi].sum() / weight_sum[lo:hi].sum()))
  return positions, losses


def cache_policies(train_len: int) -> dict:
  """The caches `eval_cache_policies` compares, each `train_len` rows or unbounded."""
  return {
    "full": None,
    "window": StreamingLLM(sink_tokens=0, window=train_len),
    "streaming": StreamingLLM(sink_tokens=SINK_TOKENS, window=train_len - SINK_TOKENS),
  }


def eval_cache_policies(exp: build.Experiment, params) -> dict[str, list]:
  """Loss by position on streams `eval.extrapolation_factor` x the training length, decoded
  from the cache in chunks of `DECODE_CHUNK` tokens under each of `cache_policies`: every
  position (`full`), the last `train_len` (`window`), and StreamingLLM's 4 sinks plus the last
  `train_len - 4` (`streaming`, Xiao et al. 2024). A stream is one text: decoding does not
  restart at document boundaries. `loss_<policy>` curves; `beyond_<policy>`, the mean loss
  past the training length; `cache_rows`, what a softmax layer holds at the stream's end.
  """
  config = exp.config
  train_len = exp.data().seq_len
  seq_len = train_len * config.eval.extrapolation_factor
  source = exp.data("eval", seq_len=seq_len)
  model = exp.model(params)
  graphdef, state = nnx.split(model)

  @jax.jit
  def decode(state, cache, tokens):
    return nnx.merge(graphdef, state).decode(tokens, cache)

  batches = [
    exp.batch(source, i, split="eval", batch_size=config.eval.batch_size)
    for i in range(config.eval.num_batches)
  ]
  results = {"train_seq_len": train_len}
  for name, policy in cache_policies(train_len).items():
    loss_sum, weight_sum = np.zeros(seq_len), np.zeros(seq_len)
    for batch in batches:
      inputs = jnp.asarray(batch["inputs"])
      cache = model.init_cache(inputs.shape[0], seq_len, policy=policy)
      logits = []
      for start in range(0, seq_len, DECODE_CHUNK):
        out, cache = decode(state, cache, inputs[:, start : start + DECODE_CHUNK])
        logits.append(out)
      token_loss = optax.softmax_cross_entropy_with_integer_labels(
        jnp.concatenate(logits, axis=1), batch["targets"]
      )
      weights = np.asarray(batch["weights"])
      loss_sum += np.asarray(token_loss * weights).sum(0)
      weight_sum += weights.sum(0)
    positions, results[f"loss_{name}"] = _buckets(loss_sum, weight_sum)
    beyond = slice(train_len, None)
    results[f"beyond_{name}"] = float(loss_sum[beyond].sum() / weight_sum[beyond].sum())
    results[f"cache_rows_{name}"] = seq_len if policy is None else train_len
  results["position"] = positions
  return results


EVALUATORS = {
  "loss": eval_loss,
  "mqar_accuracy": eval_mqar,
  "passkey": eval_passkey,
  "passkey_generation": eval_passkey_generation,
  "length_extrapolation": eval_length_extrapolation,
  "cache_policies": eval_cache_policies,
}
