"""Text LM training on the bundled corpus, and eval.py on finished runs."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import eval as eval_main
import generate as generate_main
import train
from attnjax import data, nn
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


def test_generate_refuses_runs_without_text(mqar_run, text_run):
  with pytest.raises(ValueError, match="data.kind='mqar'"):
    generate_main.run(mqar_run, "x", 4)
  with pytest.raises(ValueError, match="data.kind='text'"):
    generate_main.answers(text_run[1])
  with pytest.raises(ValueError, match="num_examples must be an int >= 1"):
    generate_main.answers(mqar_run, 0)


def test_mqar_answers_from_the_cache_are_the_models_argmax_at_the_query_keys(mqar_run):
  restored = checkpoint.restore(mqar_run)
  result = generate_main.answers(mqar_run, 8, seed=5)
  task = data.MQAR(**restored.experiment.config.data.mqar)
  rng = np.random.default_rng(5)
  examples = [task.example(rng) for _ in result["lines"]]  # the same 8 held-out examples
  inputs = np.stack([e["inputs"] for e in examples])
  argmax = np.argmax(np.asarray(restored.model(jnp.asarray(inputs))), -1)  # full forward
  right = 0
  for line, example, predicted in zip(result["lines"], examples, argmax, strict=True):
    queries = np.flatnonzero(example["weights"])
    for q in queries:
      assert f"{example['inputs'][q]}->{predicted[q]}" in line
    right += int(np.sum(predicted[queries] == example["targets"][queries]))
  assert (result["right"], result["total"]) == (right, 8 * task.num_pairs)
  recycled = generate_main.answers(mqar_run, 8, seed=5, cache_policy=nn.RecycledAttention(1, 1))
  assert recycled == result  # stride 1 attends fully at every step


def test_passkey_answers_are_the_generated_digits(tmp_path):
  config = tiny_config(steps=5, checkpoint_every=5)
  config.data.kind = "passkey"
  config.data.passkey.update(dict(seq_len=32, passkey_len=3, vocab_size=64))
  train.run(config, str(tmp_path))
  result = generate_main.answers(str(tmp_path), 2, seed=1)
  model = checkpoint.restore(str(tmp_path)).model
  rng = np.random.default_rng(1)
  for line in result["lines"]:
    inputs = data.Passkey(**config.data.passkey).example(rng)["inputs"]
    got = evaluate.passkey_answers(model, inputs[None], 3)[0]
    assert f"passkey {inputs[-3:].tolist()} -> {got.tolist()}" in line
  assert result["total"] == 2


def test_cache_policy_flags_parse():
  assert generate_main.parse_cache_policy("streaming:4,252") == nn.StreamingLLM(4, 252)
  assert generate_main.parse_cache_policy("recycled:10,256") == nn.RecycledAttention(10, 256)
  assert generate_main.parse_cache_policy("tidal:64,2,5") == nn.TidalDecode(64, (2, 5))
  assert generate_main.parse_cache_policy(None) is None
  for bad in ("window:3", "streaming:4", "recycled:a,b"):
    with pytest.raises(ValueError, match="cache_policy must be"):
      generate_main.parse_cache_policy(bad)


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
