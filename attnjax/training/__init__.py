"""Training machinery behind train.py / eval.py: config schema, sharding, optimizer,
checkpoints, metrics, the tables of model and data kinds (`tasks`), and evaluators."""
