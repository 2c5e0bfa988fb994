"""A stand-in for `gcloud compute tpus ...`: one queued resource whose workers run on this machine.

Run as `gcloud` (tests put a wrapper on PATH). Its state lives in $FAKE_GCLOUD_DIR/state.json.
The slice goes NONE -> (create) WAITING_FOR_RESOURCES -> (describe) PROVISIONING -> (describe)
ACTIVE -> (a notice) SUSPENDING -> SUSPENDED -> (delete) NONE. It has as many workers as the
accelerator type has hosts (genmask_jax/runtime/accelerators.py); worker W's home is
$FAKE_GCLOUD_DIR/home/W, wiped by each create. `ssh` runs its --command there with bash, for
real, on every worker it names at once, with HOSTNAME=fake-w-W; the output comes back in worker
order, and a worker that is unreachable prints an ssh error instead (gcloud then exits 255).
`install` links the checkout's files ($FAKE_GCLOUD_CHECKOUT, with its .venv) into ~/genmask-jax
instead of downloading anything. On a slice of several hosts a training gets what JAX needs to
find its peers (the coordinator address and Open MPI's process count and rank, which JAX's
cluster detection reads, and gloo for CPU collectives) and 1/W of the fake CPU devices.

Faults, as Cloud TPU delivers them, come from $FAKE_GCLOUD_FAULTS (JSON): a list whose i-th
entry (or null) is injected into the i-th training start by a process started beside it:
  {"kind": "notice", "when": W}             the slice turns SUSPENDING, every worker's training
                                            gets SIGTERM, is SIGKILLed after GRACE_S, then the
                                            slice turns SUSPENDED ("stuck": true: it never does)
  {"kind": "kill", "worker": N, "when": W}  worker N's training is SIGKILLed without a notice (its
                                            host died; "unreachable": true: its ssh fails too)
with W one of "start" (the training processes exist), "checkpoint" (a checkpoint newer than the
one it resumed from is complete), "save" (such a checkpoint is being written), "log:TEXT" (every
worker's log shows TEXT) or "after:SECONDS". $FAKE_GCLOUD_CREATES (JSON): a list whose i-th entry
is the state the i-th created slice stays in forever ("PROVISIONING", "WAITING_FOR_RESOURCES"),
or null. $FAKE_GCLOUD_INSTALL_FAILURES: how many installs fail first, as a package index that is
down makes them fail. Every call, fault and process is recorded in the state, so that tests can
check them and kill what is left.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent import futures

from genmask_jax.runtime import accelerators

DIR = os.environ["FAKE_GCLOUD_DIR"]
STATE = os.path.join(DIR, "state.json")
PID, EXIT, LOG = "genmask-jax-train.pid", "genmask-jax-train.exit", "genmask-jax-train.log"
GRACE_S = 60  # Cloud TPU's notice before a spot VM stops is about 30 s; CPUs here are shared.
PEERS_S = 10  # How long a host's death may take to end its peers' trainings.
DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


@contextlib.contextmanager
def locked_state():
  """The state, read and written back under a lock (the fault injector runs beside the calls)."""
  with open(os.path.join(DIR, "state.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    state = {
      "slice": "NONE",
      "workers": 0,
      "creates": 0,
      "installs": 0,
      "starts": 0,
      "unreachable": [],
      "calls": [],
      "pids": [],
      "faults": [],
    }
    if os.path.exists(STATE):
      with open(STATE) as f:
        state = json.load(f)
    yield state
    with open(STATE + ".tmp", "w") as f:
      json.dump(state, f, indent=1)
    os.replace(STATE + ".tmp", STATE)


def read_state() -> dict:
  with open(STATE) as f:  # Replaced whole: no lock needed to read it.
    return json.load(f)


def fail(message: str, code: int = 1) -> None:
  print(f"ERROR: (gcloud) {message}", file=sys.stderr)
  sys.exit(code)


def home(worker: int) -> str:
  return os.path.join(DIR, "home", str(worker))


def checkpoints(workdir: str) -> list[int]:
  folder = os.path.join(workdir, "checkpoints")
  names = os.listdir(folder) if os.path.isdir(folder) else []
  return sorted(int(n) for n in names if n.isdigit())


def saving(workdir: str) -> bool:
  """Whether Orbax is writing a checkpoint (its temporary folder exists)."""
  folder = os.path.join(workdir, "checkpoints")
  return os.path.isdir(folder) and any(".orbax-checkpoint-tmp" in n for n in os.listdir(folder))


def read_int(path: str) -> int | None:
  with contextlib.suppress(OSError, ValueError):
    with open(path) as f:
      return int(f.read())
  return None


def kill(pid: int | None, sig: int) -> None:
  if pid:
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid, sig)


def env_list(name: str) -> list:
  return json.loads(os.environ.get(name) or "[]")


def queued(verb: str, rest: list[str]) -> None:
  with locked_state() as state:
    if verb == "create":
      if state["slice"] != "NONE":
        fail(f"queued resource already exists ({state['slice']})")
      accelerator = next(a for a in rest if a.startswith("--accelerator-type="))
      state["workers"] = accelerators.parse(accelerator.partition("=")[2]).hosts
      stuck = env_list("FAKE_GCLOUD_CREATES")
      state["stuck"] = stuck[state["creates"]] if state["creates"] < len(stuck) else None
      state["creates"] += 1
      state["slice"] = "WAITING_FOR_RESOURCES"
      state["unreachable"] = []
      shutil.rmtree(os.path.join(DIR, "home"), ignore_errors=True)  # A new slice: new machines.
      for worker in range(state["workers"]):
        os.makedirs(home(worker))
    elif verb == "describe":
      if state["slice"] == "NONE":
        fail("NOT_FOUND: queued resource does not exist")
      print(state["slice"])
      following = {"WAITING_FOR_RESOURCES": "PROVISIONING", "PROVISIONING": "ACTIVE"}
      if state["slice"] in following and state["slice"] != state["stuck"]:
        state["slice"] = following[state["slice"]]  # Capacity frees up after one look.
    elif verb == "delete":
      if state["slice"] == "NONE":
        fail("NOT_FOUND: queued resource does not exist")
      for worker in range(state["workers"]):  # Deleting the VMs ends whatever ran there.
        kill(read_int(os.path.join(home(worker), PID)), signal.SIGKILL)
      state["slice"] = "NONE"
    else:
      fail(f"fake gcloud: no queued-resources {verb}", 2)


def install(checkout: str, folder: str) -> None:
  """The checkout, already set up (.venv included), instead of a download: a real folder of
  links, so that `..` from inside it is the worker's home, as on a TPU VM."""
  os.makedirs(folder)
  for name in os.listdir(checkout):
    os.symlink(os.path.join(checkout, name), os.path.join(folder, name))


def worker_env(worker: int, workers: int, port: int) -> dict[str, str]:
  env = dict(os.environ, HOSTNAME=f"fake-w-{worker}")
  if workers > 1:  # What JAX's cluster detection reads; Cloud TPU's metadata plays this role.
    env.update(
      JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
      OMPI_MCA_orte_hnp_uri="0.0;tcp://127.0.0.1:1",
      OMPI_COMM_WORLD_SIZE=str(workers),
      OMPI_COMM_WORLD_RANK=str(worker),
      OMPI_COMM_WORLD_LOCAL_RANK="0",
      JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    )
    count = DEVICE_COUNT.search(env.get("XLA_FLAGS", ""))
    if count:  # The job keeps its device count, spread over the hosts.
      share = f"--xla_force_host_platform_device_count={int(count[1]) // workers}"
      env["XLA_FLAGS"] = DEVICE_COUNT.sub(share, env["XLA_FLAGS"])
  return env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def ssh(rest: list[str]) -> None:
  command = next(a for a in rest if a.startswith("--command="))[len("--command=") :]
  which = next(a for a in rest if a.startswith("--worker=")).partition("=")[2]
  with locked_state() as state:
    if state["slice"] != "ACTIVE":
      fail(f"ssh: the slice is {state['slice']}", 255)
    workers = state["workers"]
    chosen = list(range(workers)) if which == "all" else [int(which)]
    installing = "uv pip install" in command
    if installing:
      state["installs"] += 1
      index_down = state["installs"] <= int(os.environ.get("FAKE_GCLOUD_INSTALL_FAILURES", "0"))
    start = "genmask_jax.main" in command
    if start:
      state["starts"] += 1
    unreachable = set(state["unreachable"])
  if installing:
    if index_down:
      print("error: Failed to fetch: `https://pypi.org/simple/jax/` (503)", file=sys.stderr)
      sys.exit(1)
    for worker in chosen:
      install(os.environ["FAKE_GCLOUD_CHECKOUT"], os.path.join(home(worker), "genmask-jax"))
    return
  port = free_port()

  def run(worker: int) -> tuple[int, str, str]:
    if worker in unreachable:
      return 255, "", f"ssh: connect to host fake-w-{worker} port 22: Connection timed out\n"
    env = worker_env(worker, workers, port)
    result = subprocess.run(
      ["bash", "-c", command], cwd=home(worker), env=env, capture_output=True, text=True
    )
    return result.returncode, result.stdout, result.stderr

  with futures.ThreadPoolExecutor(len(chosen)) as pool:
    results = list(pool.map(run, chosen))
  for _, out, err in results:
    sys.stdout.write(out)
    sys.stderr.write(err)
  if start:
    inject(command)
  codes = [code for code, _, _ in results]
  sys.exit(255 if 255 in codes else max(codes))


def inject(command: str) -> None:
  """Starts the process that injects this training start's fault, if it has one."""
  with locked_state() as state:
    faults = env_list("FAKE_GCLOUD_FAULTS")
    index = state["starts"] - 1
    if index >= len(faults) or faults[index] is None:
      return
    workdir = next(a for a in command.split() if a.startswith("--workdir="))[len("--workdir=") :]
    args = [sys.executable, __file__, "--inject", json.dumps(faults[index]), workdir]
    with open(os.path.join(DIR, "injector.log"), "a") as log:  # Not the caller's pipes.
      process = subprocess.Popen(args, start_new_session=True, stdout=log, stderr=log)
    state["pids"].append(process.pid)


def training_pids(workers: int) -> list[int | None]:
  return [read_int(os.path.join(home(w), PID)) for w in range(workers)]


def exits(workers: int) -> list[int | None]:
  return [read_int(os.path.join(home(w), EXIT)) for w in range(workers)]


def triggered(when: str, workdir: str, resumed_from: int, started_at: float) -> bool:
  workers = read_state()["workers"]
  if when == "start":
    return all(training_pids(workers))
  if when == "checkpoint":
    return (checkpoints(workdir) or [0])[-1] > resumed_from
  if when == "save":
    return saving(workdir)
  if when.startswith("log:"):
    text = when[len("log:") :]
    for worker in range(workers):
      with contextlib.suppress(FileNotFoundError), open(os.path.join(home(worker), LOG)) as f:
        if text in f.read():
          continue
      return False
    return True
  if when.startswith("after:"):
    return time.monotonic() - started_at > float(when[len("after:") :])
  raise ValueError(f"fake gcloud: unknown fault moment {when!r}")


def inject_fault(fault: dict, workdir: str) -> None:
  started_at = time.monotonic()
  resumed_from = (checkpoints(workdir) or [0])[-1]
  while True:
    state = read_state()
    workers = state["workers"]
    if state["slice"] != "ACTIVE" or any(code is not None for code in exits(workers)):
      return  # Deleted, or a training ended by itself.
    if triggered(fault["when"], workdir, resumed_from, started_at):
      break
    time.sleep(0.02)
  if fault["kind"] == "notice":
    notice(fault, workdir, workers)
  elif fault["kind"] == "kill":
    host_death(fault, workers)
  else:
    raise ValueError(f"fake gcloud: unknown fault {fault!r}")


def notice(fault: dict, workdir: str, workers: int) -> None:
  """A preemption: SIGTERM to every worker, SIGKILL after the grace period, then SUSPENDED."""
  with locked_state() as state:
    if state["slice"] != "ACTIVE":
      return
    state["slice"] = "SUSPENDING"  # Until the trainings are gone, as on Cloud TPU.
    pids = training_pids(workers)
    state["pids"] += [p for p in pids if p]
    during_save = saving(workdir)
  sent = time.monotonic()
  for pid in pids:
    kill(pid, signal.SIGTERM)
  deadline = sent + GRACE_S
  while None in exits(workers) and time.monotonic() < deadline:
    time.sleep(0.05)
  exited_s = time.monotonic() - sent
  killed = None in exits(workers)
  for pid in pids:
    kill(pid, signal.SIGKILL)
  wait_for_exits(workers, pids)
  with locked_state() as state:
    record = dict(fault, exits=exits(workers), killed_after_grace=killed, during_save=during_save)
    state["faults"].append(dict(record, exited_s=round(exited_s, 2)))
    if state["slice"] == "SUSPENDING" and not fault.get("stuck"):
      state["slice"] = "SUSPENDED"


def host_death(fault: dict, workers: int) -> None:
  """Worker N's training dies without a notice. Under the lock, so that the supervisor's next
  look sees the whole aftermath (its peers ending), as it would a moment later on Cloud TPU."""
  with locked_state() as state:
    if state["slice"] != "ACTIVE":
      return
    pids = training_pids(workers)
    state["pids"] += [p for p in pids if p]
    worker = fault["worker"]
    kill(pids[worker], signal.SIGKILL)
    if fault.get("unreachable"):
      state["unreachable"].append(worker)
    deadline = time.monotonic() + PEERS_S
    while None in exits(workers) and time.monotonic() < deadline:
      time.sleep(0.05)
    state["faults"].append(dict(fault, exits=exits(workers)))


def wait_for_exits(workers: int, pids: list[int | None]) -> None:
  """Until every training is gone and its wrapper has written its exit status."""
  for pid in pids:
    while pid and os.path.exists(f"/proc/{pid}"):
      time.sleep(0.05)
  deadline = time.monotonic() + 5
  while None in exits(workers) and time.monotonic() < deadline:
    time.sleep(0.05)


def main(argv: list[str]) -> None:
  if argv[:1] == ["--inject"]:
    inject_fault(json.loads(argv[1]), argv[2])
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
