"""Training machinery behind train.py / eval.py: the config schema (`config`), what a config
builds (`build`: mesh, model and data kinds, the abstract and sharded train state), the jitted
train and eval steps (`step`), the loop (`loop`), checkpoints and `restore` (`checkpoint`),
sharding rules, optimizer, metrics, multi-host start-up and the evaluators (`evaluate`)."""
