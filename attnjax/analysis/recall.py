"""Recall against state size: how much an autoregressive decoder keeps, and the MQAR scatter.

Zoology (Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language
Models", arXiv 2312.04927) and BASED (Arora et al. 2024, arXiv 2402.18668) plot MQAR accuracy
against each mixer's recurrent state: the numbers a decoder must keep per sequence to emit the
next token. `state_size` counts them the same way, in floats per layer at the task's sequence
length `L`:

| variants                                 | state per layer                                  |
|------------------------------------------|--------------------------------------------------|
| `softmax`, `gated`, `sinks`, `prefix_lm` | KV cache `2 * L * kv_heads * head_dim`           |
| `sliding_window` (`window` w)            | KV cache of `min(w, L)` tokens                   |
| `chunked` (`chunk_size` c)               | KV cache of `min(c, L)` tokens                   |
| `cca` (`group_size` g, `window` w)       | `L // g` core tokens per query head, plus the    |
|                                          | KV cache of `min(max(w, g), L)` recent tokens    |
| `linear`, `based`, `gla`, `retention`,   | `heads * key_dim * (head_dim + 1 if normalized)`,|
| `lightning`                              | `key_dim` the feature map's output size          |

Learned parameters (sink tokens, gates) are not state. A model with a hybrid `layer_pattern`
reports the mean over its layers (its total state divided by its depth). Other variants raise
`ValueError` rather than guess.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence

from flax import nnx
from matplotlib.figure import Figure

from attnjax import registry
from attnjax.nn.attention import resolve_heads
from attnjax.nn.lm import parse_layer_pattern
from attnjax.ops.linear import feature_maps


@dataclasses.dataclass(frozen=True)
class _Layer:
  """One mixer of a model: its variant, head layout, options and the sequence length."""

  name: str
  seq_len: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  options: Mapping

  def option(self, key: str):
    """The mixer option `key`, else the default of the variant's op (one source of truth)."""
    if key in self.options:
      return self.options[key]
    return inspect.signature(registry.get(self.name).op).parameters[key].default

  def kv_cache(self, tokens: int) -> int:
    """Floats of the keys and values of `tokens` positions."""
    return 2 * min(tokens, self.seq_len) * self.num_kv_heads * self.head_dim


def _full_kv(layer: _Layer) -> int:
  return layer.kv_cache(layer.seq_len)


def _cca(layer: _Layer) -> int:
  # A decoder keeps the pooled cores of complete groups (per query head) plus the raw tokens
  # not yet covered by a visible core: its window reaches back to the last visible group,
  # at most `window + group_size - 1` tokens.
  group_size, window = layer.option("group_size"), layer.option("window")
  cores = 2 * (layer.seq_len // group_size) * layer.num_heads * layer.head_dim
  return cores + layer.kv_cache(window + group_size - 1)


def _linear(layer: _Layer) -> int:
  defaults = registry.get(layer.name).defaults
  # The mixer itself says how wide its query heads are (BASED's feature_dim, a qk_dim option).
  mixer = nnx.eval_shape(
    lambda: registry.mixer_class(layer.name)(
      layer.embed_dim,
      num_heads=layer.num_heads,
      num_kv_heads=layer.num_kv_heads,
      head_dim=layer.head_dim,
      variant=layer.name,
      rngs=nnx.Rngs(0),
      **layer.options,
    )
  )
  qk_dim = mixer.q.shape[-1]
  key_dim = feature_maps.feature_dim(defaults.get("feature_map"), qk_dim)
  value_dim = layer.head_dim + (1 if defaults.get("normalize") else 0)
  return layer.num_heads * key_dim * value_dim


_LAYER_STATE: dict[str, Callable[[_Layer], int]] = {
  "softmax": _full_kv,
  "gated": _full_kv,
  "sinks": _full_kv,
  "prefix_lm": _full_kv,
  "sliding_window": lambda layer: layer.kv_cache(layer.option("window")),
  "chunked": lambda layer: layer.kv_cache(layer.option("chunk_size")),
  "cca": _cca,
  "linear": _linear,
  "based": _linear,
  "gla": _linear,
  "retention": _linear,
  "lightning": _linear,
}


def state_size(config, *, seq_len: int | None = None) -> float:
  """Floats of recurrent state per layer and sequence of `config`'s model (see module doc).

  Args:
    config: an experiment config (`configs/mqar.py`'s `get_config(...)`): its `model` gives
      the layer pattern, heads, head_dim and mixer options.
    seq_len: the decoded length; None: `config.data.mqar.seq_len`.

  Returns:
    The state of one layer; for a hybrid `layer_pattern`, the mean over the layers.
  """
  m = config.model
  seq_len = config.data.mqar.seq_len if seq_len is None else seq_len
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got seq_len={seq_len}")
  num_kv_heads, head_dim = resolve_heads(
    m.embed_dim, m.num_heads, m.num_kv_heads or None, m.head_dim or None
  )
  names = parse_layer_pattern(m.layer_pattern, m.depth)
  unknown = sorted({name for name in names if name not in _LAYER_STATE})
  if unknown:
    raise ValueError(
      f"state_size does not know the decoding state of {unknown} "
      f"(model.layer_pattern={m.layer_pattern!r}); known: {sorted(_LAYER_STATE)}"
    )
  total = 0
  for name in names:
    options = dict(m.mixer_options.get(name, {}))
    layer = _Layer(name, seq_len, m.embed_dim, m.num_heads, num_kv_heads, head_dim, options)
    total += _LAYER_STATE[name](layer)
  return total / len(names)


def plot_recall_vs_state_size(results: Sequence[Mapping], *, title: str | None = None):
  """MQAR accuracy against state size, one labelled point per run, log-scaled x axis.

  Args:
    results: dicts with `name` (label), `state_size` (floats, > 0) and `accuracy` (0..1).
    title: the axes title; None: "MQAR recall vs state size".

  Returns:
    A `matplotlib.figure.Figure` (not registered with pyplot; a notebook displays it as a
    cell's last value, `fig.savefig(path)` writes it).
  """
  if not results:
    raise ValueError("results must hold at least one {name, state_size, accuracy} dict, got []")
  for i, row in enumerate(results):
    missing = sorted({"name", "state_size", "accuracy"} - set(row))
    if missing:
      raise ValueError(f"results[{i}] lacks keys {missing}; got keys {sorted(row)}")
    if not row["state_size"] > 0:
      raise ValueError(f"results[{i}]['state_size'] must be positive, got {row['state_size']}")
  fig = Figure(figsize=(5.5, 4), layout="tight")
  ax = fig.add_subplot()
  for row in results:
    ax.scatter(row["state_size"], row["accuracy"], s=40)
    ax.annotate(
      row["name"],
      (row["state_size"], row["accuracy"]),
      textcoords="offset points",
      xytext=(5, 4),
      fontsize=9,
    )
  ax.set_xscale("log")
  ax.set_ylim(-0.05, 1.05)
  ax.set_xlabel("recurrent state per layer (floats)")
  ax.set_ylabel("MQAR accuracy")
  ax.set_title("MQAR recall vs state size" if title is None else title)
  ax.grid(True, which="both", alpha=0.3)
  return fig
