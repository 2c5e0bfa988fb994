"""Preemption notices: the trainer checkpoints the current step and exits cleanly when told.

Cloud TPU VMs (spot or maintenance) send SIGTERM some time before they stop the machine. In a
multi-process job `jax.distributed` already listens for it: its preemption sync manager tells
every process to stop at the same step (`reached_preemption_sync_point`), so that all of them
save that step together. A single process (no distributed runtime) gets a SIGTERM handler here
that only raises a flag: the step in flight finishes, the loop saves and returns.
"""

from __future__ import annotations

import signal
import threading

from absl import logging
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils

_requested = threading.Event()


def _sync_manager():
  return jax_distributed.global_state.preemption_sync_manager


def _on_sigterm(signum, frame) -> None:
  del signum, frame
  _requested.set()


def install() -> None:
  """Starts listening for SIGTERM; call once per process, after `jax.distributed` is set up.

  With a distributed runtime its own SIGTERM handler is in place (replacing it would blind the
  other processes to this one's notice), so there is nothing to do.
  """
  if _sync_manager() is not None:
    return
  if threading.current_thread() is not threading.main_thread():
    return  # Python only delivers signals to the main thread.
  signal.signal(signal.SIGTERM, _on_sigterm)


def reached(step: int) -> bool:
  """Whether the loop should checkpoint `step` and stop; every process calls it every step."""
  if _sync_manager() is not None:
    stop = multihost_utils.reached_preemption_sync_point(step)
  else:
    stop = _requested.is_set()
  if stop:
    logging.warning("preemption notice: checkpointing step %d and stopping", step)
  return stop
