"""Text: a TFDS builder over local `.txt` files, a byte tokenizer, and packed sequences.

    build(source_dir, data_dir)           # once: array_record files, no TensorFlow needed
    PackedText(data_dir, "train", seq_len=256).batch(step, seed=0, global_batch_size=32)

`PackedText` is a grain `MapDataset` pipeline: the documents are shuffled (a new order every
epoch), tokenized, concatenated and cut into windows of `seq_len + 1` tokens, each with the
segment ids of its documents. Window `i` is a pure function of (seed, i), so global batch
`step` is windows `step * B ... step * B + B - 1` and every process reads only its rows.
"""

from __future__ import annotations

import functools
import os

import grain
import numpy as np
import tensorflow_datasets as tfds

from attnjax.data.source import process_rows

DEFAULT_SOURCE_DIR = os.path.join(os.path.dirname(__file__), "corpus", "python_docs")
SPLITS = {"train": "train", "eval": "validation", "test": "validation"}


class ByteTokenizer:
  """UTF-8 bytes shifted by 2: id 0 is padding, 1 ends a document, 2 + b is byte b."""

  PAD, EOS, OFFSET = 0, 1, 2
  vocab_size = 256 + OFFSET

  def encode(self, text: str | bytes) -> np.ndarray:
    """`text` -> int32 `[num_bytes + 1]` ids ending with EOS."""
    data = text.encode() if isinstance(text, str) else text
    return np.append(np.frombuffer(data, np.uint8).astype(np.int32) + self.OFFSET, self.EOS)

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return bytes((ids[ids >= self.OFFSET] - self.OFFSET).astype(np.uint8)).decode(errors="replace")


class LocalText(tfds.core.GeneratorBasedBuilder):
  """TFDS dataset `local_text` of the `.txt` files of `source_dir`, one example per file."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, source_dir: str | None = None, **kwargs):
    self.source_dir = source_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Local text files, one document per file.",
      features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
    )

  def _split_generators(self, dl_manager):
    names = sorted(n for n in os.listdir(self.source_dir) if n.endswith(".txt"))
    if not names:
      raise ValueError(f"source_dir {self.source_dir!r} has no .txt files")
    held_out = set(names[::10])
    return {
      "train": self._generate_examples([n for n in names if n not in held_out]),
      "validation": self._generate_examples(sorted(held_out)),
    }

  def _generate_examples(self, names):
    for name in names:
      with open(os.path.join(self.source_dir, name), encoding="utf-8") as f:
        yield name, {"text": f.read()}


def build(source_dir: str, data_dir: str) -> None:
  """Writes the `local_text` dataset of `source_dir` under `data_dir` (no-op if present)."""
  builder = LocalText(source_dir=source_dir, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()


class PackedText:
  """Windows `{inputs, targets, weights, segment_ids}` `[seq_len]` over packed documents.

  Targets are the inputs shifted by one; `weights` is 0 where the target starts a new
  document (nothing in context predicts it).
  """

  def __init__(self, data_dir: str, split: str, *, seq_len: int):
    self.seq_len = seq_len
    self.tokenizer = ByteTokenizer()
    self.vocab_size = self.tokenizer.vocab_size
    source = tfds.data_source("local_text", data_dir=data_dir)[SPLITS[split]]
    self.docs = grain.MapDataset.source(source).map(lambda e: self.tokenizer.encode(e["text"]))
    self.lengths = np.array([len(doc) for doc in self.docs], np.int64)
    self.windows_per_epoch = (int(self.lengths.sum()) - 1) // seq_len
    if self.windows_per_epoch < 1:
      raise ValueError(f"split {split!r} has fewer than seq_len + 1 = {seq_len + 1} tokens")

  @functools.lru_cache(maxsize=4)  # noqa: B019 - a handful of (seed, epoch) orders per source
  def _epoch(self, seed: int, epoch: int):
    """(document order, start offset of each document in the epoch's token stream)."""
    n = len(self.lengths)
    order = grain.MapDataset.range(n).shuffle(seed=seed)
    doc_ids = np.array([order[epoch * n + j] for j in range(n)])
    return doc_ids, np.concatenate([[0], np.cumsum(self.lengths[doc_ids])])

  def window(self, seed: int, index: int) -> dict[str, np.ndarray]:
    """Window `index` of the endless stream of epochs shuffled by `seed`."""
    epoch, k = divmod(index, self.windows_per_epoch)
    doc_ids, starts = self._epoch(seed, epoch)
    lo, hi = k * self.seq_len, k * self.seq_len + self.seq_len + 1
    first, last = np.searchsorted(starts, lo, "right") - 1, np.searchsorted(starts, hi, "left")
    tokens = np.concatenate([self.docs[int(d)] for d in doc_ids[first:last]])
    segments = np.repeat(np.arange(1, last - first + 1), self.lengths[doc_ids[first:last]])
    offset = lo - starts[first]
    tokens, segments = (
      tokens[offset : offset + self.seq_len + 1],
      segments[offset:][: self.seq_len + 1],
    )
    return {
      "inputs": tokens[:-1],
      "targets": tokens[1:],
      "weights": (segments[:-1] == segments[1:]).astype(np.float32),
      "segment_ids": segments[:-1],
    }

  def batch(
    self,
    step: int,
    *,
    seed: int,
    global_batch_size: int,
    split: str = "train",
    process_index: int = 0,
    process_count: int = 1,
  ) -> dict[str, np.ndarray]:
    """Rows of global batch `step` owned by `process_index`, each `[rows, seq_len]`."""
    rows = process_rows(global_batch_size, process_index, process_count)
    windows = [self.window(seed, step * global_batch_size + row) for row in rows]
    return {
      key: np.stack([w[key] for w in windows]).astype(np.float32 if key == "weights" else np.int32)
      for key in windows[0]
    }
