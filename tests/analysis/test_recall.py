"""State sizes against hand-computed counts, and the recall-vs-state-size figure."""

import pytest
from matplotlib.figure import Figure

from attnjax.analysis.recall import plot_recall_vs_state_size, state_size
from configs import mqar

# configs/mqar.py: seq_len 64, embed 64, 2 heads of head_dim 32, 2 layers.
L, HEADS, HEAD_DIM = 64, 2, 32


def _config(preset, **model):
  config = mqar.get_config(preset)
  with config.unlocked():
    for key, value in model.items():
      config.model[key] = value
  return config


@pytest.mark.parametrize(
  "preset, model, expected",
  [
    ("softmax", {}, 2 * L * HEADS * HEAD_DIM),
    ("softmax", {"num_kv_heads": 1}, 2 * L * 1 * HEAD_DIM),  # GQA shrinks the cache
    ("gated", {}, 2 * L * HEADS * HEAD_DIM),
    ("sliding_window", {}, 2 * 8 * HEADS * HEAD_DIM),  # mqar's window of 8
    ("sliding_window", {"mixer_options": {"sliding_window": {"window": 100}}}, 2 * L * 64),
    ("sliding_window", {"mixer_options": {}}, 2 * L * 64),  # op default 256 > L
    ("chunked", {}, 2 * 16 * HEADS * HEAD_DIM),
    ("cca", {}, 2 * (L // 4) * HEADS * HEAD_DIM + 2 * (8 + 4 - 1) * HEADS * HEAD_DIM),
    ("linear", {}, HEADS * HEAD_DIM * (HEAD_DIM + 1)),  # elu+1 keeps a normalizer column
    ("gla", {}, HEADS * HEAD_DIM * HEAD_DIM),
    ("retention", {}, HEADS * HEAD_DIM * HEAD_DIM),
    ("based", {}, HEADS * (1 + 16 + 16**2) * (HEAD_DIM + 1)),  # Taylor features of dim 16
    ("based", {"mixer_options": {"based": {"feature_dim": 8}}}, HEADS * 73 * (HEAD_DIM + 1)),
    ("hybrid_sliding_window", {}, (2 * L * 64 + 2 * 8 * 64) / 2),  # mean over the two layers
  ],
  ids=lambda x: str(x) if not isinstance(x, dict) else "-".join(f"{k}={v}" for k, v in x.items()),
)
def test_state_size_matches_hand_count(preset, model, expected):
  assert state_size(_config(preset, **model)) == expected


def test_state_size_grows_with_seq_len_for_softmax_only():
  assert state_size(_config("softmax"), seq_len=128) == 2 * 128 * HEADS * HEAD_DIM
  assert state_size(_config("gla"), seq_len=128) == state_size(_config("gla"))


def test_state_size_rejects_unknown_variants_and_lengths():
  with pytest.raises(ValueError, match="aaren"):
    state_size(_config("aaren"))
  with pytest.raises(ValueError, match="seq_len"):
    state_size(_config("softmax"), seq_len=0)


def test_plot_has_one_labelled_point_per_result_on_log_x():
  results = [
    {"name": "softmax", "state_size": 8192, "accuracy": 0.99},
    {"name": "gla", "state_size": 2048, "accuracy": 0.4},
    {"name": "sliding_window", "state_size": 1024, "accuracy": 0.1},
  ]
  fig = plot_recall_vs_state_size(results)
  assert isinstance(fig, Figure)
  (ax,) = fig.axes
  assert ax.get_xscale() == "log"
  assert [t.get_text() for t in ax.texts] == ["softmax", "gla", "sliding_window"]
  points = [tuple(c.get_offsets()[0]) for c in ax.collections]
  assert points == [(8192, 0.99), (2048, 0.4), (1024, 0.1)]


@pytest.mark.parametrize(
  "results, match",
  [([], "at least one"), ([{"name": "a", "accuracy": 1.0}], "state_size"),
   ([{"name": "a", "state_size": 0, "accuracy": 1.0}], "positive")],
)  # fmt: skip
def test_plot_rejects_bad_results(results, match):
  with pytest.raises(ValueError, match=match):
    plot_recall_vs_state_size(results)
