"""Which JAX backends a process starts: no TPU backend on a host without TPU chips.

libtpu is installed on every machine (requirements.txt) for the compile-only TPU targets of
launch/compile.py. Left alone, JAX would also try to start a TPU backend on each CPU or GPU
host: libtpu then prints warnings about a TPU it cannot find, and holds its one-process lock
(/tmp/libtpu_lockfile) for the process's lifetime, so that no other process on the host could
compile for a TPU target. A platform list the user sets (JAX_PLATFORMS) is left as it is.

Runs when genmask_jax is imported, without importing JAX (configs import the package and stay
free of it): the platforms go to JAX's config right after JAX is imported, or at once if it
already is. Not through JAX_PLATFORMS, which child processes would inherit: a launcher on a
login node without GPUs would pass "cpu" on to the cluster jobs it submits.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.util
import os
import sys

GOOGLE = "0x1ae0"  # PCI vendor id.
ACCELERATOR_CLASS = "0x12"  # PCI class "processing accelerator" (a gVNIC is a network device).
CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


def _read(path: str) -> str:
  with open(path) as f:
    return f.read().strip()


def has_tpu_chips() -> bool:
  """Whether the host has TPU chips: Google PCI devices of the processing-accelerator class."""
  for device in glob.glob("/sys/bus/pci/devices/*"):
    try:
      if _read(f"{device}/vendor") == GOOGLE and _read(f"{device}/class").startswith(
        ACCELERATOR_CLASS
      ):
        return True
    except OSError:
      continue
  return False


def has_cuda() -> bool:
  """Whether the host shows an NVIDIA GPU and JAX's CUDA plugin is installed."""
  gpus = glob.glob("/proc/driver/nvidia/gpus/*") or glob.glob("/dev/nvidia[0-9]*")
  return bool(gpus) and any(importlib.util.find_spec(p) for p in CUDA_PLUGINS)


def _platforms() -> str | None:
  """The platforms to limit JAX to; None to leave it as it is."""
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return None
  if has_tpu_chips():
    return None
  return "cuda,cpu" if has_cuda() else "cpu"


def _limit(jax, platforms: str) -> None:
  from jax._src import xla_bridge

  if not jax.config.jax_platforms and not xla_bridge.backends_are_initialized():
    jax.config.update("jax_platforms", platforms)


class _AfterJaxImport(importlib.abc.MetaPathFinder):
  """Calls `then(jax)` once `import jax` has run jax/__init__.py (no backend starts before)."""

  def __init__(self, then):
    self.then = then

  def find_spec(self, name, path=None, target=None):
    if name != "jax":
      return None
    sys.meta_path.remove(self)  # The real finders locate jax; this finder is done.
    spec = importlib.util.find_spec(name)
    run_init = spec.loader.exec_module

    def exec_module(module):
      run_init(module)
      self.then(module)

    spec.loader.exec_module = exec_module  # This spec's own loader instance.
    return spec


def skip_absent_tpu() -> None:
  """Limits JAX to the CPU (and CUDA where a GPU is usable) when libtpu is installed but the host
  has no TPU chip; does nothing once JAX has started a backend."""
  platforms = _platforms()
  if platforms is None:
    return
  if "jax" in sys.modules:
    _limit(sys.modules["jax"], platforms)
  elif not any(isinstance(f, _AfterJaxImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterJaxImport(lambda jax: _limit(jax, platforms)))
