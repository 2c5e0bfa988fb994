"""One holder at a time for a job's folder (local or gs://): a lease file that its holder renews.

The claim is atomic: the lease file is created only if absent and replaced only if unchanged
since it was read (fileio.create_new, fileio.replace_if_unchanged), so of processes that claim
it at the same moment exactly one holds it. Another process may take it over once it was
released, once it went unrenewed for its duration (its holder stopped or lost touch; judged by
the clocks of two machines, so durations are minutes), or at once when its holder ran on this
host and that process is gone: a process is known by its pid and its start time, which a pid
reused by a later process does not share. A holder that finds its lease taken over (a renewal
that fails its precondition) must stop acting for the job: `check()` raises from then on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import uuid

from absl import logging

from genmask_jax.runtime import fileio


class LeaseHeld(RuntimeError):
  """Another live process holds the lease."""

  def __init__(self, path: str, holder: dict):
    self.holder = holder
    ago = time.time() - holder["renewed_at"]
    super().__init__(
      f"{path}: held by pid {holder['pid']} on {holder['host']}, renewed {ago:.0f} s ago "
      f"(it expires after {holder['duration_s']:.0f} s without renewal)"
    )


class LeaseLost(RuntimeError):
  """Another process took the lease over from this one."""


def process_start(pid: int) -> str | None:
  """When process `pid` of this host started (None: no such process). With the pid it names one
  process: a pid reused later has another start time."""
  stat = f"/proc/{pid}/stat"
  if os.path.exists("/proc/self/stat"):  # Linux: boot id and start time in clock ticks.
    try:
      with open(stat) as f:
        fields = f.read().rsplit(")", 1)[1].split()  # The command name may hold spaces.
      with open("/proc/sys/kernel/random/boot_id") as f:
        return f"{f.read().strip()}:{fields[19]}"
    except FileNotFoundError:
      return None
  result = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True)
  return result.stdout.strip() or None  # macOS and other BSDs: to the second.


class Lease:
  """The lease in file `path`, for this process; `duration_s` without renewal ends it."""

  def __init__(self, path: str, duration_s: float):
    self.path, self.duration_s = path, duration_s
    self.host, self.pid = socket.gethostname(), os.getpid()
    self.token = uuid.uuid4().hex
    self._version: str | None = None
    self._lock = threading.Lock()
    self._lost: str | None = None
    self._stop = threading.Event()
    self._renewer: threading.Thread | None = None

  def _record(self, released: bool = False) -> bytes:
    record = {
      "token": self.token,
      "host": self.host,
      "pid": self.pid,
      "process_start": process_start(self.pid),
      "renewed_at": time.time(),
      "duration_s": self.duration_s,
      "released": released,
    }
    return json.dumps(record, indent=1).encode()

  def _live(self, holder: dict) -> bool:
    if holder["released"]:
      return False
    if holder["host"] == self.host:
      return process_start(holder["pid"]) == holder["process_start"]
    return time.time() - holder["renewed_at"] < holder["duration_s"]

  def acquire(self) -> None:
    """Holds the lease, or raises LeaseHeld naming its live holder."""
    fileio.makedirs(os.path.dirname(self.path))
    holder = None
    for _ in range(3):  # Each lost race means another process holds a fresh lease: looked at.
      version = fileio.create_new(self.path, self._record())
      if version is None:
        data, current = fileio.read_versioned(self.path)
        holder = read(self.path, data)
        if self._live(holder):
          raise LeaseHeld(self.path, holder)
        version = fileio.replace_if_unchanged(self.path, self._record(), current)
      if version is not None:
        self._version = version
        return
    raise LeaseHeld(self.path, holder)

  def renew(self) -> None:
    """Renews the lease; LeaseLost (from now on, from `check` too) if it was taken over."""
    with self._lock:
      self.check()
      version = fileio.replace_if_unchanged(self.path, self._record(), self._version)
      if version is None:
        try:
          holder = read(self.path)
          self._lost = f"pid {holder['pid']} on {holder['host']} took over {self.path}"
        except FileNotFoundError:
          self._lost = f"{self.path} was removed"
        self.check()
      self._version = version

  def check(self) -> None:
    """Raises LeaseLost if the lease was taken over."""
    if self._lost is not None:
      raise LeaseLost(self._lost)

  def keep_renewed(self, every_s: float) -> None:
    """Renews the lease every `every_s` seconds from a thread, whatever the caller is busy with
    (an install can outlast the lease); storage errors are retried at the next renewal."""

    def renew_until_stopped() -> None:
      while not self._stop.wait(every_s):
        try:
          self.renew()
        except LeaseLost as e:
          logging.error("lease lost: %s", e)
          return
        except OSError as e:
          logging.warning("renewing %s failed (retried in %g s): %s", self.path, every_s, e)

    self._renewer = threading.Thread(target=renew_until_stopped, name="lease", daemon=True)
    self._renewer.start()

  def release(self) -> None:
    """Gives the lease up (unless it was taken over), so that the next claim needs no wait."""
    self._stop.set()
    if self._renewer is not None:
      self._renewer.join()
    with self._lock:
      if self._lost is None and self._version is not None:
        fileio.replace_if_unchanged(self.path, self._record(released=True), self._version)
        self._version = None


def read(path: str, data: bytes | None = None) -> dict:
  """The record in lease file `path` (`data`: its bytes, already read)."""
  try:
    return json.loads(fileio.read_bytes(path) if data is None else data)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not a lease record ({e}); remove it if no process holds it") from e
