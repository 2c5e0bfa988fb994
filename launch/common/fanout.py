"""One worker process per local device for the resumable, sharded precompute entry points.

`launch/precompute_vlm.py --gpus=all` (or `--gpus=0,1`, or `--gpus=cpu:2` for CPU workers) and
`launch/precompute_latents.py --gpus=...` re-run themselves once per device with
CUDA_VISIBLE_DEVICES set to that device and `--num_workers=N --worker_index=i`, wait for every
worker, show one progress bar for the whole store (counted from the files in the store, so other
nodes' work shows too) and exit non-zero naming each worker that failed. Workers' output goes to
one log file each. A node of a multi-node job (`--num_nodes=M --node_index=k`, as a Slurm job
array task runs it) runs the workers k*G .. k*G+G-1 of M*G. Workers whose share is already
written are not started, so a re-run does only what is missing.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from genmask_jax.data import store
from launch.common import commands

# The flags the fan-out sets for each worker; the rest of the command line is passed through.
FANOUT_FLAGS = ("gpus", "num_nodes", "node_index", "worker_logs", "num_workers", "worker_index")
_LOG_TAIL_LINES = 20


class FanoutError(ValueError):
  """The fan-out's flags or devices are not usable."""


@dataclasses.dataclass(frozen=True)
class Flags:
  gpus: Any
  num_nodes: Any
  node_index: Any
  worker_logs: Any


def define_flags() -> Flags:
  """The fan-out's absl flags, for an entry point that has --num_workers and --worker_index."""
  from absl import flags

  return Flags(
    flags.DEFINE_string(
      "gpus", None, "Run one worker per device and wait: all, CUDA ids (0,1) or cpu:N."
    ),
    flags.DEFINE_integer("num_nodes", 1, "With --gpus: nodes running this command."),
    flags.DEFINE_integer("node_index", 0, "With --gpus: this node, in [0, num_nodes)."),
    flags.DEFINE_string("worker_logs", "precompute_logs", "With --gpus: the workers' log folder."),
  )


@dataclasses.dataclass(frozen=True)
class Device:
  """Where one worker runs: `name` for messages, `env` for its process, `torch` for --device."""

  name: str
  env: dict[str, str]
  torch: str


def _visible_gpus() -> list[str]:
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:  # Set by Slurm and by users: exactly the GPUs this job may use.
    return [d.strip() for d in visible.split(",") if d.strip()]
  try:  # nvidia-smi, not torch or JAX: the parent never touches a GPU.
    out = subprocess.run(
      ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
      check=True,
      capture_output=True,
      text=True,
    ).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise FanoutError(
      f"--gpus=all: CUDA_VISIBLE_DEVICES is unset and nvidia-smi failed ({e}); "
      "name the GPUs (--gpus=0,1) or run CPU workers (--gpus=cpu:N)"
    ) from e
  return out.split()


def parse_devices(spec: str) -> list[Device]:
  """Devices of --gpus: "all" (the visible GPUs), "0,1,3" (CUDA ids) or "cpu:N" (N CPU workers)."""
  if spec.startswith("cpu:"):
    count = spec.removeprefix("cpu:")
    if not count.isdigit() or int(count) < 1:
      raise FanoutError(f"--gpus={spec}: expected cpu:N with N >= 1")
    n = int(count)
    # Split the cores between workers (unless the user chose a thread count); hide any GPU.
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n))
    env = {"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": threads}
    return [Device(f"cpu:{i}", env, "cpu") for i in range(n)]
  ids = _visible_gpus() if spec == "all" else [d.strip() for d in spec.split(",") if d.strip()]
  if not ids:
    raise FanoutError(f"--gpus={spec}: no GPU to run on")
  if len(set(ids)) != len(ids):
    raise FanoutError(f"--gpus={spec}: a GPU is named twice")
  return [Device(f"GPU {d}", {"CUDA_VISIBLE_DEVICES": d}, "cuda") for d in ids]


def node_workers(num_devices: int, num_nodes: int, node_index: int) -> tuple[int, list[int]]:
  """(workers in the whole job, this node's worker indices): node k runs k*G .. k*G+G-1."""
  if not 0 <= node_index < num_nodes:
    raise FanoutError(f"--node_index={node_index} outside [0, --num_nodes={num_nodes})")
  first = node_index * num_devices
  return num_nodes * num_devices, list(range(first, first + num_devices))


def forwarded_argv(argv: Sequence[str], owned: Sequence[str] = FANOUT_FLAGS) -> list[str]:
  """argv without the flags in `owned` (as --name=value or --name value)."""
  kept, skip_value = [], False
  for arg in argv:
    if skip_value:
      skip_value = False
      continue
    name, has_value, _ = arg.lstrip("-").partition("=")
    if arg.startswith("-") and name in owned:
      skip_value = not has_value
      continue
    kept.append(arg)
  return kept


def check_flags() -> None:
  """--gpus sets --num_workers/--worker_index itself; --num_nodes/--node_index need --gpus."""
  from absl import app, flags

  given = lambda *names: " and ".join(f"--{n}" for n in names if flags.FLAGS[n].present)
  if flags.FLAGS.gpus and given("num_workers", "worker_index"):
    raise app.UsageError(f"--gpus sets {given('num_workers', 'worker_index')} itself")
  if not flags.FLAGS.gpus and given("num_nodes", "node_index"):
    raise app.UsageError(f"{given('num_nodes', 'node_index')}: only with --gpus")


def plan(fan: Flags) -> tuple[list[Device], int, list[int]]:
  """This node's devices, the job's worker count and this node's worker indices, in order."""
  devices = parse_devices(fan.gpus.value)
  num_workers, indices = node_workers(len(devices), fan.num_nodes.value, fan.node_index.value)
  return devices, num_workers, indices


@dataclasses.dataclass(frozen=True)
class Worker:
  """Worker `index` of `num_workers`: the entry point's `argv` with those two flags added."""

  index: int
  num_workers: int
  device: Device
  argv: list[str]

  @property
  def command(self) -> list[str]:
    return [*self.argv, f"--num_workers={self.num_workers}", f"--worker_index={self.index}"]

  @property
  def name(self) -> str:
    return f"worker {self.index} of {self.num_workers} ({self.device.name})"

  def log_path(self, log_dir: str, job: str) -> str:
    return os.path.join(log_dir, f"{job}-worker-{self.index:05d}-of-{self.num_workers:05d}.log")


def worker_env(device: Device) -> dict[str, str]:
  env = dict(os.environ, **device.env)
  # The workers run `-m launch...` from the user's folder (relative paths stay valid).
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [commands.PROJECT_ROOT, env.get("PYTHONPATH")]))
  return env


def _exit_reason(code: int) -> str:
  if code < 0:
    return f"was killed by {signal.Signals(-code).name}"
  return f"exited with status {code}"


def _tail(path: str) -> str:
  with open(path, errors="replace") as f:
    return "".join(f.readlines()[-_LOG_TAIL_LINES:])


def _stop(processes: Sequence[subprocess.Popen]) -> None:
  for p in processes:
    if p.poll() is None:
      p.terminate()
  for p in processes:
    try:
      p.wait(timeout=30)
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def run(
  workers: Sequence[Worker],
  job: str,
  log_dir: str,
  total: int,
  done: Callable[[], int],
  poll_seconds: float = 2.0,
) -> None:
  """Runs the workers at once and waits; raises SystemExit naming every worker that failed.

  `done()` counts the samples already in the store(s) out of `total`, for the progress bar. A
  failed worker does not stop the others: their shards stay valid for the re-run.
  """
  from tqdm import tqdm

  os.makedirs(log_dir, exist_ok=True)
  processes, logs = [], []
  try:
    for w in workers:
      logs.append(w.log_path(log_dir, job))
      with open(logs[-1], "ab") as log:  # Appended: a re-run keeps the failed run's log.
        log.write(f"# {w.name}: {shlex.join(w.command)}\n".encode())
        log.flush()
        processes.append(
          subprocess.Popen(
            w.command, env=worker_env(w.device), stdout=log, stderr=subprocess.STDOUT
          )
        )
    # Redrawn rarely when the output is a file (a Slurm log), not every poll.
    interval = 0.1 if sys.stderr.isatty() else 60.0
    with tqdm(total=total, initial=done(), unit="sample", desc=job, mininterval=interval) as bar:
      while any(p.poll() is None for p in processes):
        time.sleep(poll_seconds)
        bar.update(done() - bar.n)
      bar.update(done() - bar.n)
  finally:
    _stop(processes)  # Only on an error or Ctrl-C are any still running.
  failures = [
    f"{w.name} {_exit_reason(p.returncode)}; log {log}, ending:\n{_tail(log)}"
    for w, p, log in zip(workers, processes, logs, strict=True)
    if p.returncode != 0
  ]
  if failures:
    raise SystemExit("\n".join(failures) + "\nre-run the same command to finish the missing shards")


def run_store_workers(
  workers: Sequence[Worker],
  job: str,
  log_dir: str,
  kind: str,
  layouts: dict[str, store.StoreLayout],
) -> None:
  """Runs the workers whose part of any of the `kind` stores (folder -> layout) is missing, as
  `run` does, counting progress from the shards written; logs which stores are complete."""
  from absl import logging

  missing = {out: set(store.missing_workers(out, layout)) for out, layout in layouts.items()}
  todo = [w for w in workers if any(w.index in m for m in missing.values())]
  total = sum(layout.num_samples for layout in layouts.values())
  done = lambda: sum(store.written_rows(out, kind, layout) for out, layout in layouts.items())
  run(todo, job, log_dir, total, done)
  for out in layouts:
    state = "complete" if store.is_complete(out) else "other nodes' workers missing"
    logging.info("%s: %s", out, state)
