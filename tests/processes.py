"""Subprocesses of the tests: ports chosen by the OS, waits bounded by progress rather than by
wall time, and no process left running when a test fails."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Sequence

# A process that has written nothing for this long is hung, however loaded the machine: the
# trainer logs at start-up, after compiling and every few steps.
STALL_S = 300
# How a coordinator says its port was taken between free_port() and its bind.
PORT_TAKEN = re.compile(r"address already in use|failed to add port|failed to bind", re.I)


def free_port() -> int:
  """A TCP port on 127.0.0.1 that the OS reports free. The coordinator binds it later, so
  another process may take it first: callers retry when a log matches PORT_TAKEN."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Processes:
  """Starts processes with their output in log files; on leaving the `with` block every process
  still running is killed and reaped, whether the test passed or not."""

  def __init__(self):
    self.started: list[tuple[subprocess.Popen, str]] = []

  def __enter__(self) -> Processes:
    return self

  def __exit__(self, *exc) -> None:
    self.kill()

  def start(self, args: Sequence[str], log: str, **kwargs) -> subprocess.Popen:
    with open(log, "w") as f:
      process = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, **kwargs)
    self.started.append((process, str(log)))
    return process

  def kill(self) -> None:
    for process, _ in self.started:
      if process.poll() is None:
        process.kill()
      process.wait()

  def log(self, process: subprocess.Popen) -> str:
    return next(open(log).read() for p, log in self.started if p is process)


def _signature(paths: Sequence[str]) -> list:
  """Sizes and modification times of the files under `paths`: changes when anything is written."""
  out = []
  for path in paths:
    for folder, _, files in os.walk(path) if os.path.isdir(path) else [("", [], [path])]:
      for name in files:
        try:
          st = os.stat(os.path.join(folder, name))
        except FileNotFoundError:
          continue
        out.append((folder, name, st.st_size, st.st_mtime_ns))
  return sorted(out)


def wait(
  processes: Sequence[subprocess.Popen],
  watch: Sequence[str],
  until: Callable[[], bool] | None = None,
  stall_s: float = STALL_S,
  poll_s: float = 0.05,
) -> None:
  """Returns when every process has exited, when one has failed (the others may be waiting
  for it in a collective) or when `until()` holds. Fails when nothing under `watch` (logs,
  work directories) has changed for `stall_s` seconds."""
  last, changed = _signature(watch), time.monotonic()
  while True:
    if until is not None and until():
      return
    codes = [p.poll() for p in processes]
    if all(c is not None for c in codes) or any(c for c in codes):
      return
    now = _signature(watch)
    if now != last:
      last, changed = now, time.monotonic()
    elif time.monotonic() - changed > stall_s:
      raise AssertionError(f"no progress in {stall_s} s under {list(watch)}")
    time.sleep(poll_s)
