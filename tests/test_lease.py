"""Conditional writes (fileio) and the lease built on them, on local disk and on a GCS API server
(fake-gcs-server, whose generation preconditions these tests check first)."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from genmask_jax.runtime import fileio, lease


@pytest.fixture(params=["local", "gcs"])
def folder(request, tmp_path):
  if request.param == "local":
    return str(tmp_path)
  return request.getfixturevalue("bucket") + "/run"


def test_conditional_writes(folder):
  path = f"{folder}/x.json"
  first = fileio.create_new(path, b"1")
  assert first is not None and fileio.create_new(path, b"2") is None
  assert fileio.read_versioned(path) == (b"1", first)
  second = fileio.replace_if_unchanged(path, b"3", first)
  assert second is not None and second != first
  assert fileio.replace_if_unchanged(path, b"4", first) is None  # Stale: someone wrote since.
  assert fileio.read_versioned(path) == (b"3", second)
  assert fileio.replace_if_unchanged(f"{folder}/none.json", b"5", first) is None
  with pytest.raises(FileNotFoundError, match="none.json does not exist"):
    fileio.read_versioned(f"{folder}/none.json")


def test_of_racing_writers_exactly_one_succeeds(folder):
  """Sixteen threads create one path, then replace it from one version: one wins each race."""
  barrier = threading.Barrier(16)
  created, replaced = [], []

  def create(i: int) -> None:
    barrier.wait()
    created.append(fileio.create_new(f"{folder}/race", str(i).encode()))

  def replace(i: int, version: str) -> None:
    barrier.wait()
    # Unlike any created content: locally a version is the content's digest, so a rewrite with
    # the created bytes would leave the version unchanged (and a second replace would succeed).
    replaced.append(fileio.replace_if_unchanged(f"{folder}/race", f"r{i}".encode(), version))

  for target, extra in ((create, ()), (replace, None)):
    if extra is None:
      extra = (fileio.read_versioned(f"{folder}/race")[1],)
    threads = [threading.Thread(target=target, args=(i, *extra)) for i in range(16)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  assert sum(v is not None for v in created) == 1
  assert sum(v is not None for v in replaced) == 1


def write_holder(path: str, **fields) -> None:
  """Overwrites lease file `path` as another holder would have written it."""
  record = json.loads(fileio.read_bytes(path))
  fileio.write_bytes(path, json.dumps(dict(record, **fields)).encode())


def test_one_holder_at_a_time(folder):
  path = f"{folder}/job.lease"
  first, second = lease.Lease(path, 60), lease.Lease(path, 60)
  first.acquire()
  with pytest.raises(lease.LeaseHeld, match=f"held by pid {os.getpid()} on "):
    second.acquire()  # Its holder, on this host, is alive (it is this very process).
  first.renew()
  first.release()
  second.acquire()  # Released: no wait.
  second.release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(folder):
  """Its pid now names no process, or a later one (another start time): pid reuse fools no
  claim. The holder it was, if it still ran, would find out at its next renewal."""
  path = f"{folder}/job.lease"
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
  )
  for holder in ({"pid": int(dead.stdout)}, {"process_start": "another start"}):
    old, new = lease.Lease(path, 60), lease.Lease(path, 60)
    old.acquire()
    write_holder(path, **holder)
    old._version = fileio.read_versioned(path)[1]  # As if `old` had written it.
    new.acquire()
    with pytest.raises(lease.LeaseLost, match=f"pid {os.getpid()} on .* took over"):
      old.renew()
    with pytest.raises(lease.LeaseLost):
      old.check()
    new.release()


def test_a_holder_on_another_host_is_taken_over_once_it_expired(folder):
  path = f"{folder}/job.lease"
  other = lease.Lease(path, 60)
  other.acquire()
  write_holder(path, host="elsewhere", renewed_at=time.time() - 30)
  with pytest.raises(lease.LeaseHeld, match="held by pid .* on elsewhere, renewed 30 s ago"):
    lease.Lease(path, 60).acquire()
  write_holder(path, renewed_at=time.time() - 61)
  taker = lease.Lease(path, 60)
  taker.acquire()
  assert lease.read(path)["token"] == taker.token
  taker.release()
  assert lease.read(path)["released"]


def test_the_lease_is_renewed_while_its_holder_is_busy(folder):
  path = f"{folder}/job.lease"
  holder = lease.Lease(path, 60)
  holder.acquire()
  before = lease.read(path)["renewed_at"]
  holder.keep_renewed(0.05)
  deadline = time.monotonic() + 30
  while lease.read(path)["renewed_at"] == before:
    assert time.monotonic() < deadline
    time.sleep(0.05)
  holder.release()
  assert lease.read(path)["released"]
