"""Text pipeline: byte tokenizer, TFDS builder (array_record), packed windows, sharding."""

import numpy as np
import pytest

from attnjax.data import text


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  source = tmp_path_factory.mktemp("source")
  rng = np.random.default_rng(0)
  for i in range(12):
    words = rng.choice(["alpha", "beta", "gamma", "délta"], size=rng.integers(5, 40))
    (source / f"doc{i:02d}.txt").write_text(f"doc {i}: " + " ".join(words), encoding="utf-8")
  out = tmp_path_factory.mktemp("tfds")
  text.build(str(source), str(out))
  return str(out)


def test_byte_tokenizer_round_trips_utf8():
  tok = text.ByteTokenizer()
  ids = tok.encode("héllo\n")
  assert ids[-1] == tok.EOS and ids.min() >= tok.EOS and ids.max() < tok.vocab_size
  assert tok.decode(ids) == "héllo\n"


def test_splits_hold_every_document_once(data_dir):
  train = text.PackedText(data_dir, "train", seq_len=16)
  held_out = text.PackedText(data_dir, "eval", seq_len=16)
  assert len(train.lengths) == 10 and len(held_out.lengths) == 2  # files 0 and 10 held out


def test_windows_tile_the_shuffled_document_stream(data_dir):
  packed = text.PackedText(data_dir, "train", seq_len=16)
  tok = packed.tokenizer
  windows = [packed.window(seed=3, index=i) for i in range(packed.windows_per_epoch)]
  stream = np.concatenate([windows[0]["inputs"][:1]] + [w["targets"] for w in windows])
  doc_ids, _ = packed._epoch(3, 0)
  expected = np.concatenate([packed.docs[int(d)] for d in doc_ids])
  np.testing.assert_array_equal(stream, expected[: len(stream)])
  assert sorted(doc_ids) == list(range(10)) and list(doc_ids) != list(range(10))
  for w in windows:
    ends = w["inputs"] == tok.EOS  # the token after an EOS starts a new document
    assert np.all(w["weights"][ends] == 0) and np.all(w["weights"][~ends] == 1)
    assert np.all(np.diff(w["segment_ids"]) == ends[:-1])


def test_batches_are_deterministic_reshuffled_per_epoch_and_split_by_process(data_dir):
  packed = text.PackedText(data_dir, "train", seq_len=16)
  full = packed.batch(2, seed=0, global_batch_size=4)
  again = packed.batch(2, seed=0, global_batch_size=4)
  for key in full:
    np.testing.assert_array_equal(full[key], again[key])
  halves = [
    packed.batch(2, seed=0, global_batch_size=4, process_index=i, process_count=2) for i in (0, 1)
  ]
  np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]), full["inputs"])
  assert full["segment_ids"].dtype == np.int32 and full["weights"].dtype == np.float32
  epoch0, epoch1 = packed._epoch(0, 0)[0], packed._epoch(0, 1)[0]
  assert list(epoch0) != list(epoch1)
  assert not np.array_equal(packed.batch(2, seed=1, global_batch_size=4)["inputs"], full["inputs"])
