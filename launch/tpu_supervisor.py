r"""Supervised pod runs: training that outlives its submitter and survives spot preemption.

  python -m launch.tpu_pod supervise --name=genmask-v5p --zone=us-east5-a --queued --spot \
      --accelerator_type=v5p-64 --config=configs/genmask.py --workdir=gs://my-bucket/genmask/run1

`supervise` brings the slice up (create, wait until ACTIVE, install), starts training detached
on every worker, then polls: the slice's state (`describe`), the workers' training processes
(one ssh probe) and the run's progress in the work directory (checkpoints/, metrics.jsonl).
When the slice is preempted or lost, or a worker's training died or stalled, it deletes the
slice, waits a backoff, re-creates it with the same flags, reinstalls and starts the same
training command, which resumes from the latest checkpoint. It stops when the final checkpoint
is written (deleting the slice unless --keep) or after --max_restarts restarts.

Everything it knows lives in `<workdir>/supervisor.json`, not in this process: the same command
run again (from another machine too) re-attaches to a run in progress without starting a second
training, and `status` reads it. Each worker's training writes its pid and, when it ends, its
exit status next to its log (~/genmask-jax-train.{pid,exit}), which the probe reads.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time

from genmask_jax.runtime import fileio
from launch import commands, tpu_vm

STATE_FILE = "supervisor.json"
REMOTE_PID = "genmask-jax-train.pid"
REMOTE_EXIT = "genmask-jax-train.exit"
PROBE_TAG = "genmask-train:"
HEALTHY = ("ACTIVE", "READY")  # Queued resource / TPU VM states in which training can run.
PENDING = ("ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "CREATING", "STARTING")
# Preempted, but the workers may still be saving their checkpoint in the notice's grace period.
STOPPING = ("SUSPENDING", "STOPPING")
FINISHED, FAILED = "finished", "failed"
BAD_PROBES = 3  # Consecutive probes without an answer from every worker before a restart.
KILLED = ("exited 0", "exited 137", "exited 143")  # Ended by a notice or a signal, not a bug.


def state_path(workdir: str) -> str:
  return os.path.join(workdir, STATE_FILE)


def start_command(args: commands.Flags) -> list[str]:
  """Starts training detached on every worker; the worker keeps its pid and exit status."""
  env = commands.assignments(args.env, "--env", commands.ENV_NAME)
  setup = tpu_vm.and_steps(["cd", tpu_vm.REMOTE_DIR], *(["export", f"{k}={v}"] for k, v in env))
  train = shlex.join(
    commands.train_command(".venv/bin/python", args.config, args.workdir, args.config_overrides)
  )
  pid, status, log = (shlex.quote(f"../{f}") for f in (REMOTE_PID, REMOTE_EXIT, tpu_vm.REMOTE_LOG))
  # `wait` hands back training's own exit status (143 after an unhandled SIGTERM).
  inner = f"{train} & echo $! > {pid}; wait $!; echo $? > {status}"
  remote = (
    f"{setup} && rm -f {pid} {status}"
    f" && (nohup sh -c {shlex.quote(inner)} > {log} 2>&1 < /dev/null &)"
  )
  return tpu_vm.ssh_command(args, "all", remote)


def probe_command(args: commands.Flags) -> list[str]:
  """Each worker prints one line: its training is `running`, `exited N`, or `absent`."""
  pid, status = REMOTE_PID, REMOTE_EXIT
  remote = (
    f'if [ -e {status} ]; then echo "{PROBE_TAG} exited $(cat {status})"; '
    f'elif [ -e {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then echo "{PROBE_TAG} running"; '
    f'else echo "{PROBE_TAG} absent"; fi'
  )
  return tpu_vm.ssh_command(args, "all", remote)


def slice_state_command(args: commands.Flags) -> list[str]:
  if args.queued:
    return tpu_vm.describe_command(args)
  return tpu_vm.gcloud(args, "tpu-vm", "describe", args.name, "--format=value(state)")


def read_progress(workdir: str) -> dict:
  """The run's progress from its work directory: last complete checkpoint, total steps (from
  that checkpoint's config), last logged step and the last measured steps/s."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = sorted((int(n) for n in fileio.listdir(ckpt_dir) if n.isdigit()), reverse=True)
  # Orbax renames a finished step into place locally; on object storage it marks it committed.
  done = [s for s in steps if not fileio.is_remote(workdir) or _committed(ckpt_dir, s)][:1]
  progress = {"checkpoint": done[0] if done else None, "total_steps": None, "step": None}
  if done:  # The config item of Orbax's JSON handler.
    config = fileio.read_json(os.path.join(ckpt_dir, str(done[0]), "config", "metadata"))
    progress["total_steps"] = config.get("total_steps")
  metrics = os.path.join(workdir, "metrics.jsonl")
  text = fileio.read_text(metrics) if fileio.exists(metrics) else ""
  for line in reversed(text.splitlines()):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # A line being written.
    progress["step"] = progress["step"] or record.get("step")
    if "steps_per_s" in record:
      progress["steps_per_s"] = record["steps_per_s"]
      break
  return progress


def _committed(ckpt_dir: str, step: int) -> bool:
  return fileio.exists(os.path.join(ckpt_dir, str(step), "commit_success.txt"))


def is_finished(progress: dict) -> bool:
  total = progress.get("total_steps")
  return total is not None and progress.get("checkpoint") == total


class Supervisor:
  """One run's supervision; every decision it takes is recorded in supervisor.json first."""

  def __init__(self, shell: commands.Shell, args: commands.Flags):
    self.shell, self.args = shell, args
    self.path = state_path(args.workdir)
    self.bad_probes = 0
    self.hopeless = False  # Set when a restart cannot help.
    self.state = fileio.read_json(self.path) if fileio.exists(self.path) else {}
    self.state.setdefault("restarts", 0)
    self.state.setdefault("attempts", 0)
    self.state.setdefault("events", [])
    self.state.update(name=args.name, zone=args.zone, queued=args.queued)
    self.state["max_restarts"] = args.max_restarts

  # --- state -------------------------------------------------------------------------------

  def save(self, **changes) -> None:
    self.state.update(changes)
    self.state["supervisor"] = {"host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}
    fileio.makedirs(self.args.workdir)
    fileio.write_json(self.path, self.state, indent=1)

  def event(self, kind: str, detail: str = "") -> None:
    step = self.state.get("progress", {}).get("checkpoint")
    self.state["events"].append({"at": time.time(), "event": kind, "detail": detail, "step": step})
    self.save()
    print(f"[supervisor] {kind}{': ' + detail if detail else ''}", file=sys.stderr, flush=True)

  def claim(self) -> None:
    """Refuses to run beside another live supervisor of this run."""
    other = self.state.get("supervisor")
    if not other or other["pid"] == os.getpid():
      return
    if other["host"] == socket.gethostname():
      alive = _pid_alive(other["pid"])
    else:  # Its heartbeat comes with every poll.
      alive = time.time() - other["at"] < 3 * self.args.poll_seconds + 120
    if alive:
      raise SystemExit(
        f"{self.path}: supervisor pid {other['pid']} on {other['host']} is watching this run; "
        "stop it first (training goes on without it) or wait for its heartbeat to age"
      )

  # --- the loop ----------------------------------------------------------------------------

  def run(self) -> int:
    self.claim()
    phase = self.state.get("phase")
    if phase == FINISHED:
      print(f"[supervisor] {self.args.workdir} has finished already", file=sys.stderr)
      return 0
    if phase == "training":
      self.event("re-attached", f"attempt {self.state['attempts']} on {self.args.name}")
      trouble = None
    else:  # New, or the previous supervisor stopped while bringing a slice up, or gave up.
      self.event("submitted" if phase is None else "resumed", f"phase {phase}")
      trouble = self.bring_up(delete_first=phase is not None)
    while True:
      if trouble is None:
        trouble = self.poll()
      if trouble == FINISHED:
        return self.finish()
      if trouble is not None:
        if self.hopeless or self.state["restarts"] >= self.args.max_restarts:
          return self.give_up(trouble)
        trouble = self.restart(trouble)
        continue
      time.sleep(self.args.poll_seconds)

  def bring_up(self, delete_first: bool) -> str | None:
    """(Delete,) create, wait, install, start; returns what went wrong, or None."""
    self.save(phase="starting")
    try:
      if delete_first:  # Whatever is left of the previous slice.
        self.delete_slice()
      self.shell.run(tpu_vm.create_command(self.args))
      if (state := self.wait_until_ready()) is not None:
        return f"the slice became {state} before it was ready"
      tpu_vm.install(self.shell, self.args)
      self.shell.run(start_command(self.args))
    except subprocess.CalledProcessError as e:
      return f"bringing the slice up failed: {shlex.join(e.cmd)} exited {e.returncode}"
    self.bad_probes = 0
    self.save(phase="training", attempts=self.state["attempts"] + 1, started_at=time.time())
    self.event("training", f"attempt {self.state['attempts']} started on every worker")
    return None

  def wait_until_ready(self) -> str | None:
    """None once the slice can run training; its state if it failed instead."""
    while (state := self.slice_state()) not in HEALTHY:
      if state not in PENDING:
        return state
      self.save(slice=state)  # Also the heartbeat: waiting for capacity can take hours.
      time.sleep(self.args.poll_seconds)
    self.save(slice=state)
    return None

  def restart(self, reason: str) -> str | None:
    restarts = self.state["restarts"] + 1
    self.save(restarts=restarts, phase="restarting")
    self.event("restart", f"{restarts} of at most {self.args.max_restarts}: {reason}")
    self.delete_slice()
    backoff = min(self.args.backoff_seconds * 2 ** (restarts - 1), self.args.max_backoff_seconds)
    time.sleep(backoff)  # Capacity lost to a preemption rarely returns at once.
    return self.bring_up(delete_first=False)

  def poll(self) -> str | None:
    """None while training runs; FINISHED; or the reason the slice must be rebuilt."""
    slice_state = self.slice_state()
    progress = self.update_progress()
    self.save(slice=slice_state)
    if slice_state in STOPPING:
      return None  # Deleting it now would cut the workers' last checkpoint short.
    if slice_state not in HEALTHY:
      return FINISHED if is_finished(progress) else f"slice {slice_state} (preempted or lost)"
    workers = self.probe()
    if is_finished(progress):  # Done once the workers' last writes are too.
      return None if "running" in workers else FINISHED
    exited = sorted({w for w in workers if w.startswith("exited")})
    if exited:
      checkpoint = progress["checkpoint"]
      if any(w not in KILLED for w in exited):  # A crash: again at the same step is a bug.
        self.hopeless = self.state.get("crashed_at", -1) == checkpoint
        self.save(crashed_at=checkpoint)
      again = " again, without progress: see `logs`" if self.hopeless else ""
      return f"training {', '.join(exited)} on a worker{again}, at checkpoint {checkpoint}"
    if not workers or "absent" in workers:
      self.bad_probes += 1
      if self.bad_probes >= BAD_PROBES:
        return f"no answer from every worker's training {BAD_PROBES} times in a row"
    else:
      self.bad_probes = 0
    stalled_s = time.time() - max(progress["seen_at"], self.state["started_at"])
    if self.args.stall_minutes and stalled_s > 60 * self.args.stall_minutes:
      return f"no new step for {stalled_s / 60:.0f} min (a hung worker?)"
    return None

  def slice_state(self) -> str:
    try:
      return self.shell.read(slice_state_command(self.args)).strip() or "UNKNOWN"
    except subprocess.CalledProcessError:
      return "NOT_FOUND"

  def probe(self) -> list[str]:
    """One entry per worker that answered: running, exited N or absent."""
    try:
      out = self.shell.read(probe_command(self.args))
    except subprocess.CalledProcessError:
      return []
    return [line.split(PROBE_TAG, 1)[1].strip() for line in out.splitlines() if PROBE_TAG in line]

  def update_progress(self) -> dict:
    previous = self.state.get("progress", {})
    try:
      progress = read_progress(self.args.workdir)
    except (OSError, ValueError) as e:  # Storage hiccups must not end the supervision.
      self.shell.note(f"reading the progress in {self.args.workdir} failed: {e}")
      return dict({"checkpoint": None, "step": None, "seen_at": time.time()}, **previous)
    progress["seen_at"] = previous.get("seen_at", time.time())
    if progress["step"] != previous.get("step") or "step" not in previous:
      progress["seen_at"] = time.time()  # When this supervisor first saw the step.
    self.state["progress"] = progress
    return progress

  def delete_slice(self) -> None:
    try:
      self.shell.run(tpu_vm.delete_command(self.args))
    except subprocess.CalledProcessError:
      pass  # Already gone: preempted spot nodes may be deleted for us.

  def finish(self) -> int:
    self.release_slice()
    self.save(phase=FINISHED)
    progress = self.state["progress"]
    self.event(FINISHED, f"step {progress['checkpoint']} after {self.state['restarts']} restarts")
    return 0

  def give_up(self, reason: str) -> int:
    self.release_slice()
    self.save(phase=FAILED, reason=reason)
    self.event(
      "gave up",
      f"{reason}; --max_restarts={self.args.max_restarts} reached after "
      f"{self.state['restarts']} restarts. The last checkpoint is step "
      f"{self.state.get('progress', {}).get('checkpoint')}; the same command with a higher "
      "--max_restarts resumes from it",
    )
    return 1

  def release_slice(self) -> None:
    if self.args.keep:
      self.shell.note(f"kept {self.args.name}: {shlex.join(tpu_vm.delete_command(self.args))}")
    else:
      self.delete_slice()


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def dry_run(shell: commands.Shell, args: commands.Flags) -> None:
  """Prints the commands of one supervision cycle."""
  workdir = args.workdir
  shell.note(f"state: {state_path(workdir)}; progress: {workdir}/checkpoints, metrics.jsonl")
  shell.run(tpu_vm.create_command(args))
  ready = "ACTIVE" if args.queued else "READY"
  shell.note(f"repeated every {args.poll_seconds:g} s until it prints {ready}:")
  shell.run(slice_state_command(args))
  tpu_vm.install(shell, args)
  shell.run(start_command(args))
  shell.note(f"every {args.poll_seconds:g} s: the slice state, then each worker's training:")
  shell.run(slice_state_command(args))
  shell.run(probe_command(args))
  shell.note(
    f"on preemption, a dead or stalled worker (at most {args.max_restarts} times, after a "
    f"backoff from {args.backoff_seconds:g} s doubling up to {args.max_backoff_seconds:g} s): "
    "delete, then the same create, install and start; training resumes from its checkpoint"
  )
  shell.run(tpu_vm.delete_command(args))
  shell.note("once the final checkpoint is written" + (" (kept: --keep)" if args.keep else ":"))
  if not args.keep:
    shell.run(tpu_vm.delete_command(args))


def supervise(shell: commands.Shell, args: commands.Flags) -> None:
  if shell.dry_run:
    dry_run(shell, args)
    return
  try:
    code = Supervisor(shell, args).run()
  except KeyboardInterrupt:
    shell.note("supervisor stopped; training goes on; the same command re-attaches to it")
    code = 130
  if code:
    raise SystemExit(code)


def _ago(t: float | None) -> str:
  if t is None:
    return "never"
  s = time.time() - t
  return (
    f"{s:.0f} s ago"
    if s < 120
    else f"{s / 60:.0f} min ago"
    if s < 7200
    else f"{s / 3600:.1f} h ago"
  )


def status(shell: commands.Shell, args: commands.Flags) -> None:
  """Prints the slice state, progress, restarts and ETA of the run in --workdir."""
  path = state_path(args.workdir)
  if shell.dry_run:
    shell.note(f"reads {path}, {args.workdir}/checkpoints and metrics.jsonl; asks:")
    shell.run(slice_state_command(args))
    return
  state = fileio.read_json(path) if fileio.exists(path) else {}
  try:
    slice_state = shell.read(slice_state_command(args)).strip()
  except subprocess.CalledProcessError:
    slice_state = "NOT_FOUND"
  progress = read_progress(args.workdir)
  seen = state.get("progress", {})
  seen_at = seen.get("seen_at") if seen.get("step") == progress["step"] else None
  total, step, rate = progress["total_steps"], progress["step"], progress.get("steps_per_s")
  eta = "unknown"
  if total and step is not None and rate:
    eta = f"{(total - step) / rate / 3600:.1f} h at {rate:.3g} steps/s"
  sup = state.get("supervisor")
  events = state.get("events", [])
  lines = [
    f"run:         {args.workdir}",
    f"supervisor:  {state.get('phase', 'none (not supervised)')}"
    + (f", pid {sup['pid']} on {sup['host']}, heard from {_ago(sup['at'])}" if sup else ""),
    f"slice:       {args.name} {slice_state}",
    f"step:        {step}/{total or '?'} (seen {_ago(seen_at)}), "
    f"last checkpoint {progress['checkpoint']}",
    f"restarts:    {state.get('restarts', 0)} of at most {state.get('max_restarts', '?')}",
    f"eta:         {eta}",
  ]
  if events:
    last = events[-1]
    lines.append(f"last event:  {last['event']} {_ago(last['at'])}: {last['detail']}")
  if state.get("reason"):
    lines.append(f"gave up:     {state['reason']}")
  print("\n".join(lines), flush=True)
