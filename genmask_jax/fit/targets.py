"""Compile-only devices of real TPU slices, from libtpu's topologies, on any host.

They can be put in a mesh and compiled for (the real TPU compiler, Mosaic kernels included), but
hold no memory: nothing may create a concrete array on them.
"""

from __future__ import annotations

import os
from typing import Any

from genmask_jax.runtime.accelerators import Accelerator


def tpu_devices(accelerator: Accelerator, num_slices: int = 1) -> list[Any]:
  """The devices of `num_slices` slices of `accelerator`, one per chip."""
  # Read when libtpu first initializes, below. Compile-only use touches no chip: let several
  # processes (parallel tests, a compile beside a job) load libtpu at once, and name a slice and
  # its one worker, which libtpu would otherwise look for and warn about, at length, not finding.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator.name)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  from jax.experimental import topologies

  topology = topologies.get_topology_desc(
    platform="tpu",
    topology_name=accelerator.topology,
    chip_config_name=accelerator.chip_config,
    chips_per_host_bounds=accelerator.host_layout,
    num_slices=num_slices,
  )
  return list(topology.devices)
