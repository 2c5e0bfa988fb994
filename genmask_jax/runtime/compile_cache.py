"""JAX's persistent compilation cache, kept in the run's work directory (a folder or gs://).

A job restarted after a preemption then loads its compiled steps instead of compiling them
again on every host: JAX reads and writes cache entries through etils.epath, so a gs:// work
directory shared by the hosts serves them all. JAX_COMPILATION_CACHE_DIR, when set, wins.
"""

from __future__ import annotations

import collections
import os

import jax

SUBDIR = "compile_cache"
_EVENTS = {
  "/jax/compilation_cache/cache_hits": "hits",
  "/jax/compilation_cache/cache_misses": "misses",
}
_counts: collections.Counter = collections.Counter()
_listening = False


def _count(event: str, **kwargs) -> None:
  del kwargs
  if event in _EVENTS:
    _counts[_EVENTS[event]] += 1


def enable(workdir: str) -> str:
  """Caches every compilation under `workdir` (however long it took); returns the folder."""
  directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(workdir, SUBDIR)
  jax.config.update("jax_compilation_cache_dir", directory)
  # Small programs too: a restart should compile nothing that it compiled before.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  global _listening
  if not _listening:
    jax.monitoring.register_event_listener(_count)
    _listening = True
  return directory


def counts() -> dict[str, int]:
  """Cache hits and misses of this process's compilations so far."""
  return {name: _counts[name] for name in _EVENTS.values()}
