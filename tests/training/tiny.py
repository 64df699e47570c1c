"""A tiny MQAR config shared by the training tests (seconds per run on CPU)."""

from configs import mqar


def tiny_config(**train):
  config = mqar.get_config("softmax")
  config.model.vocab_size = 64
  config.model.embed_dim = 32
  config.model.depth = 1
  config.data.mqar.update(dict(seq_len=32, num_pairs=4, vocab_size=64))
  config.train.update(
    dict(
      steps=30,
      batch_size=8,
      learning_rate=1e-2,
      log_every=1,
      eval_every=1000,
      checkpoint_every=5,
      warmup_steps=5,
    )
  )
  config.train.update(train)
  config.eval.update(dict(batch_size=8, num_batches=1))
  return config


TINY_FLAGS = [
  "--config.model.vocab_size=64",
  "--config.model.embed_dim=32",
  "--config.model.depth=1",
  "--config.train.learning_rate=0.01",
  "--config.data.mqar.seq_len=32",
  "--config.data.mqar.vocab_size=64",
  "--config.train.batch_size=8",
  "--config.train.log_every=1",
  "--config.train.eval_every=1000",
  "--config.train.warmup_steps=5",
  "--config.eval.batch_size=8",
  "--config.eval.num_batches=1",
]
