"""Multi-process start-up: `jax.distributed.initialize` when the config or environment asks.

Environment variables (the standard ones JAX documents): `JAX_COORDINATOR_ADDRESS`
(host:port of process 0), `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`. On CPU the collectives use
gloo, so several processes on one machine behave like hosts of a pod.
"""

from __future__ import annotations

import os

import jax
import ml_collections


def maybe_initialize(config: ml_collections.ConfigDict) -> bool:
  """Initializes the distributed runtime if asked; returns whether it did."""
  address = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if not (config.initialize or address):
    return False
  num_processes = config.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0")) or None
  process_id = config.process_id
  if process_id < 0:
    process_id = int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=address or None, num_processes=num_processes, process_id=process_id
  )
  return True
