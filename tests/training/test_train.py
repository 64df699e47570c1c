"""train.py end to end on a tiny MQAR model: learning, exact resume, checkpoints, guards."""

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from flax import nnx

import train
from attnjax.training import build, checkpoint
from attnjax.training.metrics import read_metrics
from tests.training.tiny import TINY_FLAGS, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _losses(workdir):
  return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


def test_loss_decreases_over_30_steps(mqar_run):
  losses = _losses(mqar_run)
  assert sorted(losses) == list(range(1, 31))
  early, late = (
    np.mean([losses[s] for s in range(1, 6)]),
    np.mean([losses[s] for s in range(26, 31)]),
  )
  assert late < early - 0.3
  lines = read_metrics(mqar_run)
  assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= set().union(*lines)
  assert any("eval/accuracy" in line for line in lines)
  assert os.listdir(os.path.join(mqar_run, "tensorboard"))
  assert sorted(os.listdir(os.path.join(mqar_run, "checkpoints"))) == ["20", "25", "30"]


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(mqar_run, tmp_path):
  first = train.run(tiny_config(), str(tmp_path), stop_at_step=15)
  assert first["interrupted"] == "stop_at_step" and first["step"] == 15
  second = train.run(tiny_config(), str(tmp_path))
  assert second["step"] == 30
  assert _losses(tmp_path) == _losses(mqar_run)  # bit for bit


def test_corrupted_newest_checkpoint_is_skipped_with_a_warning(mqar_run, tmp_path):
  shutil.copytree(os.path.join(mqar_run, "checkpoints"), tmp_path / "checkpoints")
  newest = tmp_path / "checkpoints" / "30" / "default"
  for root, _, files in os.walk(newest):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.warns(RuntimeWarning, match="checkpoint at step 30 .* unreadable"):
    summary = train.run(tiny_config(), str(tmp_path))
  assert summary["step"] == 30
  resumed = _losses(tmp_path)
  assert sorted(resumed) == [26, 27, 28, 29, 30]  # restarted from step 25
  assert resumed == {s: loss for s, loss in _losses(mqar_run).items() if s > 25}
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the unreadable step 30 was replaced by a good one
    assert train.run(tiny_config(), str(tmp_path))["step"] == 30


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
  with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step \d+.*last good"):
    train.run(tiny_config(learning_rate=1e30, warmup_steps=0), str(tmp_path))


def test_invalid_mesh_shape_is_a_clear_error(tmp_path):
  config = tiny_config()
  config.mesh.shape.data = 3
  with pytest.raises(ValueError, match="mesh.shape .* needs 3 devices, but 8 are available"):
    train.run(config, str(tmp_path))


def test_invalid_values_fail_before_compilation_naming_the_key(tmp_path):
  config = tiny_config()
  config.data.mqar.num_pairs = 100
  with pytest.raises(ValueError, match="data.mqar: num_pairs=100"):
    train.run(config, str(tmp_path))
  config = tiny_config()
  config.model.layer_pattern = "softmax,no_such_variant"
  with pytest.raises(ValueError, match="no_such_variant"):
    train.run(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def _train_cli(workdir, *flags, **popen):
  return subprocess.Popen(
    [sys.executable, "train.py", "--config=configs/mqar.py:softmax", f"--workdir={workdir}",
     *TINY_FLAGS, *flags],
    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen,
  )  # fmt: skip


def test_unknown_config_key_fails_naming_it(tmp_path):
  proc = _train_cli(tmp_path, "--config.model.depht=3")
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0
  assert "'depht'" in out and 'Did you mean "depth"' in out
  assert not (tmp_path / "checkpoints").exists()


def test_sigkilled_run_resumes_from_its_last_checkpoint(tmp_path):
  proc = _train_cli(tmp_path, "--config.train.steps=100000", "--config.train.checkpoint_every=5")
  checkpoints = tmp_path / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and not any(
    p.isdigit() and int(p) >= 10 for p in (os.listdir(checkpoints) if checkpoints.exists() else [])
  ):
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_losses = _losses(tmp_path)
  saved = max(int(p) for p in os.listdir(checkpoints) if p.isdigit())
  assert saved >= 10
  shutil.rmtree(tmp_path / "tensorboard")
  summary = train.run(tiny_config(steps=100000), str(tmp_path), stop_at_step=saved + 3)
  assert summary["step"] == saved + 3
  resumed = [m for m in read_metrics(tmp_path) if "train/loss" in m][len(killed_losses) :]
  assert [m["step"] for m in resumed] == [saved + 1, saved + 2, saved + 3]
  for m in resumed:
    if m["step"] in killed_losses:  # steps the killed run had already logged: same loss
      assert m["train/loss"] == pytest.approx(killed_losses[m["step"]], rel=1e-6)


def test_restore_has_the_trained_parameters(mqar_run):
  config = tiny_config()
  source = build.DATASETS[config.data.kind].make(config, "eval")
  batch = source.batch(0, seed=config.seed, global_batch_size=8, split="eval")
  restored = checkpoint.restore(mqar_run)  # the run's saved config
  assert restored.step == 30 and restored.experiment.config.train.steps == 30
  untrained = build.MODELS[config.model.kind].build(config, nnx.Rngs(config.seed))
  trained_loss = float(build.lm_loss(restored.model, batch)[0])
  assert trained_loss < float(build.lm_loss(untrained, batch)[0]) - 0.3


def test_restore_without_checkpoint_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.restore(str(tmp_path), tiny_config())
