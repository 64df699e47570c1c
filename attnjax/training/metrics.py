"""Metric sinks: `DIR/metrics.jsonl` (one JSON object per line) and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np


class MetricWriter:
  """Writes `{"step": s, "split/name": value, ...}` lines; a no-op when `enabled` is False."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115 - kept open
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    values = {k: _python_float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
    self._jsonl.flush()
    for name, value in values.items():
      if value is not None and math.isfinite(value):
        self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _python_float(value) -> float | None:
  value = float(np.asarray(value))
  return value if math.isfinite(value) else None


def read_metrics(workdir: str) -> list[dict]:
  """All lines of `workdir/metrics.jsonl`, in order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
