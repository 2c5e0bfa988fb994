"""Multi-host start-up: `jax.distributed` from explicit flags or the cluster's environment."""

from __future__ import annotations

import jax
from absl import logging


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Joins the job's processes.

  Explicit arguments win. Otherwise JAX detects the cluster itself (Cloud TPU VMs through
  their metadata, SLURM through its variables, GKE, ...); where it finds none, this is a
  single-process run and nothing needs setting up.
  """
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    try:
      jax.distributed.initialize()
    except ValueError as e:
      if "coordinator_address" not in str(e):
        raise
      return  # No cluster detected.
  logging.info(
    "process %d of %d; %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
