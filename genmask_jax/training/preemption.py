"""Preemption notices: the trainer checkpoints the current step and exits cleanly when told.

Cloud TPU VMs (spot or maintenance) send SIGTERM some time before they stop the machine. In a
multi-process job `jax.distributed` already listens for it: its preemption sync manager tells
every process to stop at the same step (`reached_preemption_sync_point`), so that all of them
save that step together. A single process (no distributed runtime) gets a SIGTERM handler here
that only raises a flag: the step in flight finishes, the loop saves and returns.

Before the first step (restoring, compiling: minutes on a large model, longer than the notice's
grace period) there is nothing to save beyond the last checkpoint, so a notice then ends the
process at once with status 0: the workers are not killed at the end of the grace period, and
the slice can be rebuilt sooner. A watcher thread does it, because the main thread is inside one
long native call (Python runs signal handlers only between bytecodes). The training loop ends
that phase with `start_stepping()`, after which notices are taken at step boundaries.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading

import jax
from absl import logging
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils

# The coordination-service key under which jax.distributed's preemption sync manager records a
# notice that any process received (xla/tsl preemption_sync_manager.cc).
NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"
_POLL_S = 0.25  # How often the watcher asks the coordination service.
_EXIT_BARRIER = "genmask_preempted_before_first_step"
_EXIT_BARRIER_TIMEOUT_MS = 10_000  # Peers that do not come (hung) are left to the grace period.

_requested = threading.Event()
_phase = threading.Lock()  # Held while the watcher ends the process, or to end the watch.
_stepping = False
_wakeup_fd: int | None = None  # Read end of a pipe the C-level signal handler writes to.


def _sync_manager():
  return jax_distributed.global_state.preemption_sync_manager


def _on_sigterm(signum, frame) -> None:
  del signum, frame
  _requested.set()


def install() -> None:
  """Starts listening for SIGTERM; call once per process, after `jax.distributed` is set up,
  before the restore and the compilation.

  With a distributed runtime its own SIGTERM handler is in place (replacing it would blind the
  other processes to this one's notice); the watcher then asks the coordination service whether
  any process received a notice.
  """
  global _wakeup_fd
  if threading.current_thread() is not threading.main_thread():
    return  # Python only delivers signals to (and sets handlers from) the main thread.
  if _sync_manager() is None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    _wakeup_fd = read_fd
  threading.Thread(target=_watch, name="preemption-watcher", daemon=True).start()


def _noticed() -> bool:
  """Whether a notice arrived (in a multi-process job: at any process); waits up to _POLL_S."""
  if _sync_manager() is not None:
    client = jax_distributed.global_state.client
    try:
      client.key_value_try_get(NOTICE_KEY)
    except jax.errors.JaxRuntimeError as e:
      if "NOT_FOUND" not in str(e):
        raise
      select.select([], [], [], _POLL_S)
      return False
    return True
  # The C-level handler writes each signal's number to the pipe as it arrives.
  if select.select([_wakeup_fd], [], [], _POLL_S)[0]:
    if signal.SIGTERM in os.read(_wakeup_fd, 512):
      _requested.set()
  return _requested.is_set()


def _watch() -> None:
  while not _noticed():
    if _stepping:
      return
  with _phase:
    if _stepping:
      return  # The loop got there first: it saves the step in flight.
    logging.warning(
      "preemption notice before the first step (restoring or compiling): nothing to save "
      "beyond the last checkpoint; exiting 0 now"
    )
    _exit_now()


def _exit_now() -> None:
  """Ends the process with status 0 without unwinding the main thread's native call."""
  if _sync_manager() is not None:
    client = jax_distributed.global_state.client
    # Every process leaves together: one that ended first would make the coordination service
    # report its peers as failed, and they would abort instead of exiting 0.
    try:
      client.wait_at_barrier(_EXIT_BARRIER, _EXIT_BARRIER_TIMEOUT_MS)
    except jax.errors.JaxRuntimeError as e:  # A peer that never came: the grace period ends it.
      logging.warning("not every process reached the exit barrier: %s", e)
    if jax_distributed.global_state.service is not None:
      # The coordination service lives in this process: its peers go first.
      threading.Event().wait(1.0)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)


def start_stepping() -> None:
  """From here on the loop takes notices at step boundaries (`reached`); every process calls it
  just before its first step."""
  global _stepping
  with _phase:
    _stepping = True


def reached(step: int) -> bool:
  """Whether the loop should checkpoint `step` and stop; every process calls it every step."""
  if _sync_manager() is not None:
    stop = multihost_utils.reached_preemption_sync_point(step)
  else:
    stop = _requested.is_set()
  if stop:
    logging.warning("preemption notice: checkpointing step %d and stopping", step)
  return stop
