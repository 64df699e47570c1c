"""Text LM training on the bundled corpus, and eval.py on finished runs."""

import json
import os

import numpy as np
import pytest

import eval as eval_main
import generate as generate_main
import train
from attnjax import data
from attnjax.training import checkpoint, evaluate
from attnjax.training.metrics import read_metrics
from configs import text_lm
from tests.training.tiny import tiny_config


def tiny_text_config(data_dir):
  config = text_lm.get_config()
  config.model.update(dict(embed_dim=32, depth=1, num_heads=2, mlp_dim=64))
  config.data.text.update(dict(seq_len=64, data_dir=data_dir))
  config.train.update(
    dict(steps=30, batch_size=8, learning_rate=1e-2, warmup_steps=5, log_every=1, eval_every=30)
  )
  config.eval.update(dict(batch_size=8, num_batches=1, passkey_lengths=(32, 64)))
  config.eval.evaluators = ("loss", "length_extrapolation", "passkey")
  return config


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("text_run")
  config = tiny_text_config(str(tmp_path_factory.mktemp("tfds")))
  train.run(config, str(workdir))
  return config, str(workdir)


def test_text_loss_decreases_over_30_steps(text_run):
  _, workdir = text_run
  losses = [m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m]
  assert len(losses) == 30
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5


def test_eval_writes_curves_and_plot(text_run):
  config, workdir = text_run
  results = eval_main.run(config, workdir)
  assert results["step"] == 30
  curve = results["length_extrapolation"]
  assert curve["train_seq_len"] == 64 and max(curve["position"]) > 3 * 64
  assert all(np.isfinite(curve["loss"]))
  assert results["passkey"]["seq_len"] == [32, 64] and len(results["passkey"]["accuracy"]) == 2
  with open(os.path.join(workdir, "eval.json")) as f:
    assert json.load(f)["loss"]["loss"] == pytest.approx(results["loss"]["loss"])
  assert os.path.getsize(os.path.join(workdir, "eval.png")) > 1000


def test_generate_continues_a_prompt_with_the_runs_greedy_bytes(text_run):
  _, workdir = text_run
  text = generate_main.run(workdir, "def f(", 12)
  assert text.startswith("def f(")
  assert generate_main.run(workdir, "def f(", 12) == text  # greedy: deterministic
  sampled = generate_main.run(workdir, "def f(", 12, temperature=1.0, seed=3)
  assert sampled.startswith("def f(")


def test_passkey_generation_answers_are_the_models_greedy_digits(text_run):
  config, workdir = text_run
  restored = checkpoint.restore(workdir, config)
  source = data.Passkey(**{**config.data.passkey, "seq_len": 32})
  inputs = np.asarray(source.batch(0, seed=0, global_batch_size=8, split="eval")["inputs"])
  digits = config.data.passkey.passkey_len
  answers = evaluate.passkey_answers(restored.model, inputs, digits)
  want = inputs[:, :-digits]
  for _ in range(digits):  # greedy continuation by full forwards
    next_token = np.argmax(np.asarray(restored.model(want))[:, -1], axis=-1)
    want = np.concatenate([want, next_token[:, None]], axis=1)
  np.testing.assert_array_equal(answers, want[:, -digits:])
  result = evaluate.eval_passkey_generation(restored.experiment, restored.params)
  assert result["seq_len"] == [32, 64]
  for exact, per_digit in zip(result["accuracy"], result["digit_accuracy"], strict=True):
    assert 0.0 <= exact <= per_digit <= 1.0


def test_generate_refuses_runs_without_text(mqar_run):
  with pytest.raises(ValueError, match="data.kind='mqar'"):
    generate_main.run(mqar_run, "x", 4)


def test_eval_restores_the_saved_config_of_a_run(mqar_run, tmp_path):
  results = eval_main.run(None, mqar_run)
  assert results["step"] == 30
  final_eval = [m for m in read_metrics(mqar_run) if "eval/accuracy" in m][-1]
  assert results["loss"]["accuracy"] == pytest.approx(final_eval["eval/accuracy"])
  assert 0 <= results["mqar_accuracy"]["accuracy"] <= 1
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    eval_main.run(tiny_config(), str(tmp_path / "empty"))


def test_cache_policies_agree_until_the_first_eviction(text_run):
  """Every policy holds all of the first `train_len` positions, so their loss curves agree
  there; past it they differ, finite, with `train_len` rows for the bounded caches."""
  config, workdir = text_run
  restored = checkpoint.restore(workdir, config)
  result = evaluate.eval_cache_policies(restored.experiment, restored.params)
  train_len = result["train_seq_len"]
  early = [i for i, p in enumerate(result["position"]) if p < train_len - 4]
  assert len(early) >= 4
  for name in ("window", "streaming"):
    full, other = (np.asarray(result[f"loss_{n}"]) for n in ("full", name))
    np.testing.assert_allclose(other[early], full[early], rtol=1e-4)
    assert np.isfinite(result[f"beyond_{name}"])
    assert result[f"cache_rows_{name}"] == train_len
  assert result["cache_rows_full"] == 4 * train_len
  assert not np.allclose(result["loss_window"], result["loss_full"])
