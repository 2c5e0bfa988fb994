"""Which JAX backends a process starts: no TPU backend on a host without TPU chips.

libtpu is installed on every machine (requirements.txt) for the compile-only TPU targets of
launch/compile.py. Left alone, JAX would also try to start a TPU backend on each CPU or GPU
host: libtpu then prints warnings about a TPU it cannot find, and holds its one-process lock
(/tmp/libtpu_lockfile) for the process's lifetime, so that no other process on the host could
compile for a TPU target. A platform list the user sets (JAX_PLATFORMS) is left as it is.
"""

from __future__ import annotations

import importlib.util

import jax
from jax._src import hardware_utils  # How JAX itself finds TPU chips and visible GPUs.


def skip_absent_tpu() -> None:
  """Limits JAX to the CPU (and CUDA where a GPU is visible) when libtpu is installed but the
  host has no TPU chip. Must run before the first backend starts; later calls do nothing."""
  if jax.config.jax_platforms or importlib.util.find_spec("libtpu") is None:
    return
  if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
    return
  from jax._src import xla_bridge

  if xla_bridge.backends_are_initialized():
    return
  gpu = hardware_utils.has_visible_nvidia_gpu()
  jax.config.update("jax_platforms", "cuda,cpu" if gpu else "cpu")
