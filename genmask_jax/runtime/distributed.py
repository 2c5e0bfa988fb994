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


def wait_for_peers(name: str, timeout_s: int = 3600) -> None:
  """Blocks until every process reaches `name`, through the coordination service rather than a
  collective: processes that compile at different speeds can outlast a collective's own timeout
  (30 s for gloo on CPU) before the first step runs."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed

  jax_distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)
