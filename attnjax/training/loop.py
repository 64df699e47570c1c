"""The training loop: `run(config, workdir)` trains (or resumes) and returns a summary.

mesh and abstract init (`build.experiment`) -> data -> restore or sharded init -> loop
(donated state, JSONL and TensorBoard metrics, periodic eval and checkpoints, NaN stop, save
on SIGTERM/SIGINT). `train.py` is its command line; notebooks and tests call `run` directly.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time

import jax
from tqdm import tqdm

from attnjax.training import build, checkpoint, distributed
from attnjax.training import config as config_lib
from attnjax.training.metrics import MetricWriter
from attnjax.training.step import evaluate_loss, make_eval_step, make_train_step


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then saves, exits)."""

  def __init__(self):
    self.signal = None
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    self.signal = signal.Signals(signum).name

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def run(config, workdir: str, *, stop_at_step: int | None = None) -> dict:
  """Trains to `config.train.steps`; returns a summary with the final eval metrics.

  `stop_at_step` ends the run early at that step with a checkpoint, as a preemption would.
  """
  config_lib.validate(config)
  distributed.maybe_initialize(config.distributed)
  exp = build.experiment(config)  # the mesh, and the model's shapes and shardings: no memory
  train_source, eval_source = exp.data("train"), exp.data("eval")
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  ckpt = checkpoint.Checkpointer(
    os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints
  )
  state, start = ckpt.restore_latest(exp.abstract_state)
  if state is None:
    state, start = exp.init(), 0
  if is_main:
    print(f"{f'resuming from step {start}' if start else 'starting'}; mesh {dict(exp.mesh.shape)}")
    config_lib.save(config, workdir)
  train_step, eval_step = make_train_step(exp), make_eval_step(exp)
  writer = MetricWriter(workdir, enabled=is_main)
  stop = _StopRequest()
  steps, batch_size = config.train.steps, config.train.batch_size
  tokens_per_step = batch_size * train_source.seq_len
  progress = tqdm(
    initial=start, total=steps, disable=not is_main, mininterval=0.2 if sys.stderr.isatty() else 10
  )
  last_saved, eval_metrics, tokens_per_s = (start or None), {}, float("nan")
  t_log, step_log, t_start = time.perf_counter(), start, time.perf_counter()
  try:
    for step in range(start, steps):
      batch = exp.batch(train_source, step, split="train", batch_size=batch_size)
      state, metrics = train_step(state, batch)
      metrics = jax.device_get(metrics)  # one scalar sync per step: the NaN stop names its step
      done = step + 1
      if not math.isfinite(float(metrics["loss"])):
        raise FloatingPointError(
          f"non-finite loss {float(metrics['loss'])} at step {step}; training stopped. The last "
          f"good checkpoint (step {last_saved}) in {workdir}/checkpoints is kept."
        )
      progress.update(1)
      if step == start:  # the first step compiles: tokens/s counts from its end
        t_log, step_log = time.perf_counter(), done
      if done % config.train.log_every == 0 or done == steps:
        record = {f"train/{k}": v for k, v in metrics.items()}
        if done > step_log:
          now = time.perf_counter()
          record["train/tokens_per_s"] = tokens_per_step * (done - step_log) / (now - t_log)
          t_log, step_log = now, done
          tokens_per_s = record["train/tokens_per_s"]
        progress.set_postfix(
          loss=f"{float(metrics['loss']):.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False
        )
        writer.write(done, record)
      if done % config.train.eval_every == 0 or done == steps:
        eval_metrics = evaluate_loss(exp, eval_step, state["params"], eval_source)
        writer.write(done, {f"eval/{k}": v for k, v in eval_metrics.items()})
        if is_main:
          progress.write(f"step {done}: eval " + _format(eval_metrics))
      if stop_at_step == done:
        stop.signal = "stop_at_step"
      if done % config.train.checkpoint_every == 0 or done == steps or stop.signal:
        ckpt.save(done, state)
        last_saved = done
      if stop.signal:
        if is_main:
          progress.write(f"{stop.signal}: saved a checkpoint at step {done}, exiting")
        break
  finally:
    stop.restore()
    progress.close()
    writer.close()
    ckpt.close()
  summary = {
    "step": int(jax.device_get(state["step"])),
    "interrupted": stop.signal,
    "wall_s": time.perf_counter() - t_start,
    "eval": eval_metrics,
  }
  if is_main:
    print(f"done at step {summary['step']} in {summary['wall_s']:.1f}s; final eval: "
          + _format(eval_metrics))  # fmt: skip
  return summary


def _format(metrics: dict) -> str:
  return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
