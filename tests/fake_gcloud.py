"""A stand-in for `gcloud compute tpus ...` with one queued resource of one worker, on this machine.

Run as `gcloud` (tests put a wrapper on PATH). Its state lives in $FAKE_GCLOUD_DIR/state.json:
the slice goes NONE -> (create) WAITING_FOR_RESOURCES -> (describe) ACTIVE -> (preemption)
SUSPENDING -> SUSPENDED -> (delete) NONE. The worker's home is $FAKE_GCLOUD_DIR/home, wiped by
each create. `ssh` runs its --command there with bash, for real: `install` links the checkout's
files ($FAKE_GCLOUD_CHECKOUT, with its .venv) into ~/genmask-jax instead of downloading anything,
and a training start also starts a preemptor (`--preempt`, below) while $FAKE_GCLOUD_PREEMPTIONS
preemptions are left. A preemption, like Cloud TPU's, marks the slice SUSPENDING, sends SIGTERM
to the training, kills it after GRACE_S, then marks the slice SUSPENDED. Every call and every
process it starts is recorded in the state, so that tests can check them and kill what is left.

  FAKE_GCLOUD_PREEMPT=checkpoint  preempt once the training wrote a checkpoint it did not resume
                                  from (so every attempt makes progress);
                      start       preempt as soon as the training process exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

DIR = os.environ["FAKE_GCLOUD_DIR"]
STATE = os.path.join(DIR, "state.json")
HOME = os.path.join(DIR, "home")
PID, EXIT = "genmask-jax-train.pid", "genmask-jax-train.exit"
GRACE_S = 60  # Cloud TPU's notice before a spot VM stops is about 30 s; CPUs here are shared.


@contextlib.contextmanager
def locked_state():
  """The state, read and written back under a lock (the preemptor runs beside the calls)."""
  with open(os.path.join(DIR, "state.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    state = {"slice": "NONE", "calls": [], "pids": [], "preemptions": [], "starts": 0}
    if os.path.exists(STATE):
      with open(STATE) as f:
        state = json.load(f)
    yield state
    with open(STATE + ".tmp", "w") as f:
      json.dump(state, f, indent=1)
    os.replace(STATE + ".tmp", STATE)


def fail(message: str, code: int = 1) -> None:
  print(f"ERROR: (gcloud) {message}", file=sys.stderr)
  sys.exit(code)


def checkpoints(workdir: str) -> list[int]:
  folder = os.path.join(workdir, "checkpoints")
  names = os.listdir(folder) if os.path.isdir(folder) else []
  return sorted(int(n) for n in names if n.isdigit())


def read_pid() -> int | None:
  with contextlib.suppress(OSError, ValueError):
    with open(os.path.join(HOME, PID)) as f:
      return int(f.read())
  return None


def kill(pid: int | None, sig: int) -> None:
  if pid:
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid, sig)


def queued(verb: str, rest: list[str]) -> None:
  with locked_state() as state:
    if verb == "create":
      if state["slice"] != "NONE":
        fail(f"queued resource already exists ({state['slice']})")
      state["slice"] = "WAITING_FOR_RESOURCES"
      shutil.rmtree(HOME, ignore_errors=True)  # A new slice: fresh machines.
      os.makedirs(HOME)
    elif verb == "describe":
      if state["slice"] == "NONE":
        fail("NOT_FOUND: queued resource does not exist")
      print(state["slice"])
      if state["slice"] == "WAITING_FOR_RESOURCES":  # Capacity frees up after one look.
        state["slice"] = "ACTIVE"
    elif verb == "delete":
      if state["slice"] == "NONE":
        fail("NOT_FOUND: queued resource does not exist")
      kill(read_pid(), signal.SIGKILL)  # Deleting the VMs ends whatever ran there.
      state["slice"] = "NONE"
    else:
      fail(f"fake gcloud: no queued-resources {verb}", 2)


def install(checkout: str, folder: str) -> None:
  """The checkout, already set up (.venv included), instead of a download: a real folder of
  links, so that `..` from inside it is the worker's home, as on a TPU VM."""
  os.makedirs(folder)
  for name in os.listdir(checkout):
    os.symlink(os.path.join(checkout, name), os.path.join(folder, name))


def ssh(rest: list[str]) -> None:
  command = next(a for a in rest if a.startswith("--command="))[len("--command=") :]
  with locked_state() as state:
    if state["slice"] != "ACTIVE":
      fail(f"ssh: the slice is {state['slice']}", 255)
    if "uv pip install" in command:
      install(os.environ["FAKE_GCLOUD_CHECKOUT"], os.path.join(HOME, "genmask-jax"))
      return
    start = "genmask_jax.main" in command
    if start:
      state["starts"] += 1
  result = subprocess.run(["bash", "-c", command], cwd=HOME)
  if start:
    workdir = next(a for a in command.split() if a.startswith("--workdir="))[len("--workdir=") :]
    preemptor(workdir)
  sys.exit(result.returncode)


def preemptor(workdir: str) -> None:
  """Starts the process that will preempt this training, while preemptions are left."""
  with locked_state() as state:
    if int(os.environ.get("FAKE_GCLOUD_PREEMPTIONS", "0")) <= len(state["preemptions"]):
      return
    mode = os.environ.get("FAKE_GCLOUD_PREEMPT", "checkpoint")
    args = [sys.executable, __file__, "--preempt", mode, workdir]
    with open(os.path.join(DIR, "preemptor.log"), "a") as log:  # Not the caller's pipes.
      process = subprocess.Popen(args, start_new_session=True, stdout=log, stderr=log)
    state["pids"].append(process.pid)


def preempt(mode: str, workdir: str) -> None:
  resumed_from = (checkpoints(workdir) or [0])[-1]
  while True:
    with open(STATE) as f:  # Replaced whole: no lock needed to read it.
      state = json.load(f)
    if state["slice"] != "ACTIVE" or os.path.exists(os.path.join(HOME, EXIT)):
      return  # Deleted, or the training ended by itself.
    pid = read_pid()
    if pid and (mode == "start" or (checkpoints(workdir) or [0])[-1] > resumed_from):
      with locked_state() as state:
        if state["slice"] != "ACTIVE":
          return
        state["slice"] = "SUSPENDING"  # Until the training is gone, as on Cloud TPU.
        state["pids"].append(pid)
        state["preemptions"].append({})
      break
    time.sleep(0.02)
  kill(pid, signal.SIGTERM)
  deadline = time.monotonic() + GRACE_S
  while not os.path.exists(os.path.join(HOME, EXIT)) and time.monotonic() < deadline:
    time.sleep(0.05)
  killed = not os.path.exists(os.path.join(HOME, EXIT))
  kill(pid, signal.SIGKILL)
  while os.path.exists(f"/proc/{pid}"):
    time.sleep(0.05)
  code = None
  with contextlib.suppress(OSError, ValueError):  # The wrapper writes it once pid is gone.
    time.sleep(0.2)
    with open(os.path.join(HOME, EXIT)) as f:
      code = int(f.read())
  with locked_state() as state:
    state["preemptions"][-1] = {"exit": code, "killed_after_grace": killed}
    if state["slice"] == "SUSPENDING":
      state["slice"] = "SUSPENDED"


def main(argv: list[str]) -> None:
  if argv[:1] == ["--preempt"]:
    preempt(argv[1], argv[2])
    return
  with locked_state() as state:
    state["calls"].append(argv)
  if argv[:2] != ["compute", "tpus"] or len(argv) < 4:
    fail(f"fake gcloud: unknown command {argv}", 2)
  group, verb, rest = argv[2], argv[3], argv[4:]
  if group == "queued-resources":
    queued(verb, rest)
  elif verb == "ssh":
    ssh(rest)
  elif verb != "scp":
    fail(f"fake gcloud: no tpu-vm {verb}", 2)


if __name__ == "__main__":
  main(sys.argv[1:])
