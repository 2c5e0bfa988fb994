r"""Supervised pod runs: training that outlives its submitter and survives spot preemption.

  python -m launch.tpu_pod supervise --name=genmask-v5p --zone=us-east5-a --queued --spot \
      --accelerator_type=v5p-64 --config=configs/genmask.py --workdir=gs://my-bucket/genmask/run1

`supervise` brings the slice up (create, wait until ACTIVE, install), starts training detached
on every worker, then polls: the slice's state (`describe`), each worker's training process (one
ssh probe; a worker whose ssh fails is silent, the others' answers count) and the run's progress
in the work directory (checkpoints/, metrics.jsonl). It rebuilds the slice (delete, a doubling
backoff, the same create, install and start; training resumes from the latest checkpoint) when
- the slice was preempted or lost, or stayed in a transitional state (PROVISIONING, SUSPENDING,
  STOPPING, ...) past --transition_timeout, or queued (WAITING_FOR_RESOURCES) past
  --queue_timeout (by default it waits for capacity as long as it takes);
- a host was lost: a worker's training was killed from outside (exit 137 or 143), stopped by a
  notice (exit 0), or aborted because a peer died (JAX's "distributed service detected fatal
  errors"); or workers stayed missing (no process, or no answer) BAD_PROBES polls in a row;
- no new step was logged for --stall_minutes.
A training that fails on its own (any other exit status, with no host lost beside it) is a
crash: retried, but a second crash at the same checkpoint stops the supervisor (a new checkpoint
in between starts the count again). An install that fails while the slice stays healthy (a
package index that is down) is retried on the same slice after a backoff of its own, at most
--max_install_retries times in a row, without using up restarts. It stops when the final
checkpoint is written (deleting the slice unless --keep), after --max_restarts rebuilds, or as
above.

Everything it knows lives in `<workdir>/supervisor.json`, not in this process: the same command
run again (from another machine too) re-attaches to a run in progress without starting a second
training, and `status` reads it. One supervisor per run: it holds `<workdir>/supervisor.lease`
(genmask_jax/runtime/lease.py), claimed atomically and renewed while it runs; a second one
refuses to start while the lease is live. Each worker's training writes its pid and, when it
ends, its exit status next to its log (~/genmask-jax-train.{pid,exit}), which the probe reads.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

from genmask_jax.runtime import accelerators, fileio, lease
from launch.common import commands, tpu_vm

STATE_FILE = "supervisor.json"
LEASE_FILE = "supervisor.lease"
REMOTE_PID = "genmask-jax-train.pid"
REMOTE_EXIT = "genmask-jax-train.exit"
PROBE_TAG = "genmask-train:"
# What JAX logs when it ends a process because the coordination service reported a peer dead.
PEER_LOST = "JAX distributed service detected fatal errors"
HEALTHY = ("ACTIVE", "READY")  # Queued resource / TPU VM states in which training can run.
QUEUED = ("WAITING_FOR_RESOURCES",)  # Waiting for capacity: bounded by --queue_timeout only.
STARTING = ("ACCEPTED", "PROVISIONING", "CREATING", "STARTING")  # On the way to HEALTHY.
# Preempted, but the workers may still be saving their checkpoint in the notice's grace period.
STOPPING = ("SUSPENDING", "STOPPING")
UNKNOWN = "UNKNOWN"  # gcloud gave no answer.
FINISHED, FAILED = "finished", "failed"
BAD_PROBES = 3  # Polls in a row that cannot tell (workers missing, gcloud silent) before a rebuild.
KILLED = (128 + signal.SIGKILL, 128 + signal.SIGTERM)  # Exit statuses of a kill from outside.
QUERY_TIMEOUT_S = 300  # A gcloud query or ssh that takes longer hangs (a host that went dark).
# Before a slice with its logs is deleted, each worker's last lines go to <workdir>/LOGS_DIR.
LOGS_DIR, LOG_TAIL_LINES = "supervisor_logs", 200


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
  """Each worker prints one line: its host name and its training's state, `running`, `exited N`
  (`exited N peer` when its log shows that JAX ended it because a peer died) or `absent`."""
  pid, status = REMOTE_PID, REMOTE_EXIT
  tag = f'{PROBE_TAG} "${{HOSTNAME:-$(hostname)}}"'
  peer = f"tail -c 65536 {tpu_vm.REMOTE_LOG} 2>/dev/null | grep -qF {shlex.quote(PEER_LOST)}"
  remote = (
    f'if [ -e {status} ]; then s="$(cat {status})"; '
    f'if [ "$s" != 0 ] && {peer}; then s="$s peer"; fi; echo {tag} exited $s; '
    f'elif [ -e {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then echo {tag} running; '
    f"else echo {tag} absent; fi"
  )
  return tpu_vm.ssh_command(args, "all", remote)


def log_tails_command(args: commands.Flags) -> list[str]:
  """Each worker prints the last LOG_TAIL_LINES lines of its training log, each line prefixed
  with its host name (gcloud interleaves the workers' output)."""
  tail = f"tail -n {LOG_TAIL_LINES} {tpu_vm.REMOTE_LOG} 2>&1"
  return tpu_vm.ssh_command(args, "all", f'{tail} | sed "s/^/${{HOSTNAME:-$(hostname)}}: /"')


def parse_probe(out: str) -> list[tuple[str, str]]:
  """(host, state) of each worker that answered the probe."""
  answers = []
  for line in out.splitlines():
    if PROBE_TAG in line:
      host, _, state = line.split(PROBE_TAG, 1)[1].strip().partition(" ")
      answers.append((host, state.strip()))
  return answers


def outcome(state: str) -> str:
  """What a worker's probe answer says of its training: `running`; `stopped` (exit 0: a notice);
  `killed` (from outside); `peer` (ended by JAX because a peer died); `failed` (on its own);
  `missing` (no process and no exit status, or no answer)."""
  words = state.split()
  if words == ["running"]:
    return "running"
  if len(words) < 2 or words[0] != "exited" or not words[1].isdigit():
    return "missing"  # `absent`, `silent`, or an exit status being written.
  code = int(words[1])
  if words[2:] == ["peer"]:
    return "peer"
  return "stopped" if code == 0 else "killed" if code in KILLED else "failed"


def assess(workers: list[tuple[str, str]]) -> tuple[str | None, str]:
  """What the workers' answers call for, and the answers of those not running: None while all
  train; `crash` when a training failed on its own (no host lost beside it: peers that JAX ended
  after it are its consequence); `rebuild` when a host was lost (a training killed from outside
  or ended by a peer's death; nothing running and something exited, notices included);
  `unsure` when workers are missing or stopped beside running ones (an ssh that failed once, a
  start not visible yet, a notice being taken), which only rebuilds after BAD_PROBES polls."""
  kinds = {outcome(state) for _, state in workers}
  who = ", ".join(f"{host} {state}" for host, state in workers if state != "running")
  if kinds == {"running"}:
    return None, ""
  if "failed" in kinds and not kinds & {"killed", "stopped", "missing"}:
    return "crash", who
  if kinds & {"killed", "peer"} or ("running" not in kinds and kinds & {"stopped", "failed"}):
    return "rebuild", who
  return "unsure", who


def slice_state_command(args: commands.Flags) -> list[str]:
  if args.queued:
    return tpu_vm.describe_command(args)
  return tpu_vm.gcloud(args, "tpu-vm", "describe", args.name, "--format=value(state)")


def slice_state(shell: commands.Shell, args: commands.Flags) -> str:
  """The slice's state as gcloud describes it; NOT_FOUND when gcloud says it does not exist,
  UNKNOWN when gcloud could not tell (a network error, a timeout): that is no reason to act."""
  try:
    return shell.read(slice_state_command(args), QUERY_TIMEOUT_S).strip() or UNKNOWN
  except subprocess.CalledProcessError as e:
    return "NOT_FOUND" if "NOT_FOUND" in _text(e.stderr) else UNKNOWN
  except subprocess.TimeoutExpired:
    return UNKNOWN


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


def _timeout_s(minutes: float) -> float | None:
  """A flag's minutes as seconds; 0 means no limit."""
  return 60 * minutes if minutes else None


def _failure(e: subprocess.SubprocessError) -> str:
  """A failed command in a few words: its first arguments and how it failed."""
  cmd = e.cmd if isinstance(e.cmd, list) else [str(e.cmd)]
  words = shlex.join(cmd[:7]) + (" ..." if len(cmd) > 7 else "")
  if isinstance(e, subprocess.TimeoutExpired):
    return f"{words} ran past {e.timeout:g} s"
  return f"{words} exited {e.returncode}"


def _at(checkpoint: int | None) -> str:
  return "before the first checkpoint" if checkpoint is None else f"at checkpoint {checkpoint}"


def _text(out: str | bytes | None) -> str:
  return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


class Supervisor:
  """One run's supervision; every decision it takes is recorded in supervisor.json first."""

  def __init__(self, shell: commands.Shell, args: commands.Flags):
    self.shell, self.args = shell, args
    self.path = state_path(args.workdir)
    self.workers = accelerators.parse(args.accelerator_type).hosts
    self.bad_probes = 0
    self.running = True  # False once this process stopped supervising (recorded in the state).
    self.fatal: str | None = None  # Set, with what to do, when a rebuild cannot help.
    # Long enough for two machines' clocks and a slow storage write; renewed every poll.
    self.lease = lease.Lease(os.path.join(args.workdir, LEASE_FILE), 3 * args.poll_seconds + 120)
    self.state: dict = {}

  # --- state -------------------------------------------------------------------------------

  def load(self) -> None:
    """Reads supervisor.json (once this process holds the lease: nobody else writes it)."""
    self.state = fileio.read_json(self.path) if fileio.exists(self.path) else {}
    self.state.setdefault("restarts", 0)
    self.state.setdefault("attempts", 0)
    self.state.setdefault("events", [])
    self.state.update(name=self.args.name, zone=self.args.zone, queued=self.args.queued)
    self.state["max_restarts"] = self.args.max_restarts

  def save(self, **changes) -> None:
    self.lease.check()  # A supervisor whose lease was taken over writes nothing more.
    self.state.update(changes)
    self.state["supervisor"] = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "at": time.time(),
      "running": self.running,
    }
    fileio.makedirs(self.args.workdir)
    fileio.write_json(self.path, self.state, indent=1)

  def event(self, kind: str, detail: str = "") -> None:
    step = self.state.get("progress", {}).get("checkpoint")
    self.state["events"].append({"at": time.time(), "event": kind, "detail": detail, "step": step})
    self.save()
    print(f"[supervisor] {kind}{': ' + detail if detail else ''}", file=sys.stderr, flush=True)

  def claim(self) -> None:
    """Holds the run's lease, or refuses to run beside another live supervisor of this run."""
    try:
      self.lease.acquire()
    except lease.LeaseHeld as e:
      raise SystemExit(
        f"error: another supervisor is watching this run ({e}); stop it first (training goes "
        "on without it), or wait for its lease to expire"
      ) from None
    self.lease.keep_renewed(min(self.args.poll_seconds, self.lease.duration_s / 3))

  # --- the loop ----------------------------------------------------------------------------

  def run(self) -> int:
    self.claim()
    try:
      self.load()
      return self.supervise()
    except KeyboardInterrupt:
      self.running = False
      self.event("stopped", "this supervisor was stopped; training goes on unsupervised")
      raise
    finally:
      self.lease.release()

  def supervise(self) -> int:
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
        if self.fatal is not None:
          return self.give_up(trouble, self.fatal)
        if self.state["restarts"] >= self.args.max_restarts:
          return self.give_up(
            trouble,
            f"--max_restarts={self.args.max_restarts} reached after {self.state['restarts']} "
            "restarts; the same command with a higher --max_restarts resumes from it",
          )
        trouble = self.restart(trouble)
        continue
      time.sleep(self.args.poll_seconds)

  def bring_up(self, delete_first: bool) -> str | None:
    """(Delete,) create, wait, install, start; returns what went wrong, or None."""
    self.save(phase="starting")
    if delete_first:  # Whatever is left of the previous slice.
      self.delete_slice()
    try:
      self.shell.run(tpu_vm.create_command(self.args), _timeout_s(self.args.transition_timeout))
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
      return f"creating the slice failed: {_failure(e)}"
    self.state["slice_since"] = None  # A new slice: the clocks of its states start now.
    if (trouble := self.wait_until_ready()) is not None:
      return trouble
    if (trouble := self.install()) is not None:
      return trouble
    try:
      self.shell.run(start_command(self.args), QUERY_TIMEOUT_S)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
      return f"starting training failed: {_failure(e)}"
    self.bad_probes = 0
    checkpoint = self.update_progress()["checkpoint"]  # The one training resumes from.
    self.save(phase="training", attempts=self.state["attempts"] + 1, started_at=time.time())
    start = "from scratch" if checkpoint is None else f"from checkpoint {checkpoint}"
    self.event("training", f"attempt {self.state['attempts']} started on every worker, {start}")
    return None

  def wait_until_ready(self) -> str | None:
    """None once the slice can run training; else why it must be rebuilt."""
    while (state := self.observe_slice()) not in HEALTHY:
      if state not in (*QUEUED, *STARTING, UNKNOWN):
        return f"the slice became {state} before it was ready"
      if (late := self.overdue(state)) is not None:
        return late
      time.sleep(self.args.poll_seconds)
    return None

  def install(self) -> str | None:
    """Installs on every worker, again after a backoff while the slice stays healthy: a package
    index that is down is no reason to rebuild the slice. None once installed; else why the
    slice must be rebuilt, or (with `fatal` set) why the supervisor stops."""
    while True:
      try:
        tpu_vm.install(self.shell, self.args, _timeout_s(self.args.transition_timeout))
      except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        error = _failure(e)
      else:
        self.save(install=dict(self.state.get("install", {}), failures=0, ok_at=time.time()))
        return None
      if (state := self.observe_slice()) not in HEALTHY:
        return f"the slice became {state} while installing ({error})"
      failures = self.state.get("install", {}).get("failures", 0) + 1
      self.save(install={"failures": failures, "error": error, "at": time.time()})
      if failures > self.args.max_install_retries:
        self.fatal = (
          f"--max_install_retries={self.args.max_install_retries} reached; once the cause is "
          "fixed (the install's output is in this supervisor's log), the same command resumes "
          "from the last checkpoint"
        )
        return f"installing failed {failures} times in a row on a healthy slice: {error}"
      backoff = self.backoff(failures)
      self.event(
        "install failed",
        f"{failures} of at most {self.args.max_install_retries + 1} in a row: {error}; "
        f"again in {backoff:g} s on the same slice",
      )
      time.sleep(backoff)

  def backoff(self, count: int) -> float:
    """The wait before the `count`-th try again: doubling, capped."""
    return min(self.args.backoff_seconds * 2 ** (count - 1), self.args.max_backoff_seconds)

  def restart(self, reason: str) -> str | None:
    restarts = self.state["restarts"] + 1
    reason += self.keep_log_tails()
    self.save(restarts=restarts, phase="restarting")
    self.event("restart", f"{restarts} of at most {self.args.max_restarts}: {reason}")
    self.delete_slice()
    self.observe_slice()  # What supervisor.json says during the backoff.
    time.sleep(self.backoff(restarts))  # Capacity lost to a preemption rarely returns at once.
    return self.bring_up(delete_first=False)

  def poll(self) -> str | None:
    """None while training runs; FINISHED; or the reason the slice must be rebuilt."""
    slice_state = self.observe_slice()
    progress = self.update_progress()
    self.save()
    if slice_state in STOPPING:  # Deleting it now could cut the workers' last checkpoint short.
      return self.overdue(slice_state)
    if slice_state == UNKNOWN:  # Deleting a healthy slice for a network error loses capacity.
      return self.unsure("no answer from gcloud about the slice")
    if slice_state not in HEALTHY:
      return FINISHED if is_finished(progress) else f"slice {slice_state} (preempted or lost)"
    workers = self.probe()
    if is_finished(progress):  # Done once the workers' last writes are too.
      return None if any(state == "running" for _, state in workers) else FINISHED
    verdict, who = assess(workers)
    if verdict == "crash":
      return self.crashed(progress["checkpoint"], who)
    if verdict == "rebuild":
      return f"lost a host (or a notice stopped training): {who}"
    if verdict == "unsure":
      if (trouble := self.unsure(f"workers missing beside running ones: {who}")) is not None:
        return trouble
    else:
      self.bad_probes = 0
    stalled_s = time.time() - max(progress["seen_at"], self.state["started_at"])
    if self.args.stall_minutes and stalled_s > 60 * self.args.stall_minutes:
      return f"no new step for {stalled_s / 60:.0f} min (a hung worker?)"
    return None

  def unsure(self, what: str) -> str | None:
    """Counts a poll that found `what`; the reason for a rebuild after BAD_PROBES in a row."""
    self.bad_probes += 1
    if self.bad_probes >= BAD_PROBES:
      return f"{what} ({BAD_PROBES} polls in a row)"
    return None

  def crashed(self, checkpoint: int | None, who: str) -> str:
    """Counts a crash at `checkpoint`; the second one there (none saved in between) is fatal."""
    crash = self.state.get("crash")
    count = crash["count"] + 1 if crash and crash["checkpoint"] == checkpoint else 1
    self.save(crash={"checkpoint": checkpoint, "count": count, "at": time.time()})
    again = ""
    if count >= 2:
      again = ", again without a new checkpoint in between"
      self.fatal = (
        "a rebuild would fail the same way: fix what the workers' logs show, then the same "
        "command resumes from the last checkpoint"
      )
    return f"training failed on its own {_at(checkpoint)}{again}: {who}"

  def observe_slice(self) -> str:
    """The slice's state, recorded in supervisor.json with the time it entered that state."""
    state = self.slice_state()
    since = self.state.get("slice_since")
    if not since or since["state"] != state:
      self.state["slice_since"] = {"state": state, "at": time.time()}
    self.save(slice=state)
    return state

  def overdue(self, state: str) -> str | None:
    """Why the slice has been in `state` for too long, or None."""
    flag = "queue_timeout" if state in QUEUED else "transition_timeout"
    limit = getattr(self.args, flag)
    minutes = (time.time() - self.state["slice_since"]["at"]) / 60
    if limit and minutes > limit:
      return f"the slice stayed {state} for {minutes:.1f} min (--{flag}={limit:g})"
    return None

  def slice_state(self) -> str:
    return slice_state(self.shell, self.args)

  def probe(self) -> list[tuple[str, str]]:
    """(host, state) of each worker: running, exited N [peer], absent, or `silent` for each
    worker whose ssh failed (gcloud then fails as a whole; the others' answers are kept)."""
    try:
      out = self.shell.read(probe_command(self.args), QUERY_TIMEOUT_S)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
      out = _text(e.stdout)
    answers = parse_probe(out)
    return answers + [("a worker", "silent")] * (self.workers - len(answers))

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
    crash = self.state.get("crash")
    if crash and crash["checkpoint"] != progress["checkpoint"]:
      del self.state["crash"]  # A new checkpoint since the crash: the count starts again.
    return progress

  def delete_slice(self) -> None:
    try:
      self.shell.run(tpu_vm.delete_command(self.args), QUERY_TIMEOUT_S)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
      pass  # Already gone (preempted spot nodes may be deleted for us), or asked again next time.

  def finish(self) -> int:
    progress = self.state["progress"]
    detail = f"step {progress['checkpoint']} after {self.state['restarts']} restarts"
    self.end(FINISHED, FINISHED, detail)
    return 0

  def give_up(self, reason: str, advice: str) -> int:
    checkpoint = self.state.get("progress", {}).get("checkpoint")
    last = "none yet" if checkpoint is None else f"step {checkpoint}"
    reason += self.keep_log_tails()
    self.end(FAILED, "gave up", f"{reason}; {advice} (last checkpoint: {last})", reason=reason)
    return 1

  def keep_log_tails(self) -> str:
    """Copies the end of every worker's training log into the work directory before the slice,
    and the logs with it, is deleted; returns where, as words to add to a reason (empty when the
    slice is not healthy, training did not start, or no worker answered)."""
    if self.state.get("phase") != "training" or self.state.get("slice") not in HEALTHY:
      return ""
    try:
      out = self.shell.read(log_tails_command(self.args), QUERY_TIMEOUT_S)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
      out = _text(e.stdout)
    if not out.strip():
      return ""
    path = os.path.join(self.args.workdir, LOGS_DIR, f"attempt{self.state['attempts']}.log")
    fileio.makedirs(os.path.dirname(path))
    fileio.write_text(path, out)
    return f" (the workers' last log lines: {path})"

  def end(self, phase: str, kind: str, detail: str, **changes) -> None:
    """Releases the slice and records the end: the slice's state after the delete, and that no
    supervisor watches the run any more."""
    if self.args.keep:
      self.shell.note(f"kept {self.args.name}: {shlex.join(tpu_vm.delete_command(self.args))}")
    else:
      self.delete_slice()
    self.running = False
    self.observe_slice()
    self.save(phase=phase, **changes)
    self.event(kind, detail)


def _interrupt(signum, frame) -> None:
  del signum, frame
  raise KeyboardInterrupt  # A supervisor stopped with `kill` records it, as after Ctrl-C.


def dry_run(shell: commands.Shell, args: commands.Flags) -> None:
  """Prints the commands of one supervision cycle."""
  workdir = args.workdir
  shell.note(
    f"state: {state_path(workdir)}; lease: {os.path.join(workdir, LEASE_FILE)}; "
    f"progress: {workdir}/checkpoints, metrics.jsonl"
  )
  shell.run(tpu_vm.create_command(args))
  ready = "ACTIVE" if args.queued else "READY"
  queue = f"{args.queue_timeout:g} min" if args.queue_timeout else "no limit"
  shell.note(
    f"repeated every {args.poll_seconds:g} s until it prints {ready} (queued: {queue}; "
    f"other states: {args.transition_timeout:g} min, then a rebuild):"
  )
  shell.run(slice_state_command(args))
  shell.note(f"an install that fails is retried at most {args.max_install_retries} times:")
  tpu_vm.install(shell, args)
  shell.run(start_command(args))
  shell.note(f"every {args.poll_seconds:g} s: the slice state, then each worker's training:")
  shell.run(slice_state_command(args))
  shell.run(probe_command(args))
  shell.note(
    f"on preemption, a lost host or a stalled worker (at most {args.max_restarts} times, after "
    f"a backoff from {args.backoff_seconds:g} s doubling up to {args.max_backoff_seconds:g} s): "
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
  signal.signal(signal.SIGTERM, _interrupt)
  try:
    code = Supervisor(shell, args).run()
  except KeyboardInterrupt:
    shell.note("supervisor stopped; training goes on; the same command re-attaches to it")
    code = 130
  except lease.LeaseLost as e:
    print(f"error: {e}; this supervisor stops, the other one watches the run", file=sys.stderr)
    code = 1
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
  """Prints the supervisor, slice state, progress, restarts, crashes, install failures and ETA
  of the run in --workdir."""
  path = state_path(args.workdir)
  if shell.dry_run:
    shell.note(f"reads {path}, {args.workdir}/checkpoints and metrics.jsonl; asks:")
    shell.run(slice_state_command(args))
    return
  state = fileio.read_json(path) if fileio.exists(path) else {}
  now = slice_state(shell, args)
  progress = read_progress(args.workdir)
  seen = state.get("progress", {})
  seen_at = seen.get("seen_at") if seen.get("step") == progress["step"] else None
  total, step, rate = progress["total_steps"], progress["step"], progress.get("steps_per_s")
  eta = "unknown"
  if total and step is not None and rate:
    eta = f"{(total - step) / rate / 3600:.1f} h at {rate:.3g} steps/s"
  since = state.get("slice_since") or {}
  in_state = f" (since {_ago(since['at'])})" if since.get("state") == now else ""
  lines = [
    f"run:         {args.workdir}",
    f"supervisor:  {state.get('phase', 'none (not supervised)')}{_supervisor(args.workdir)}",
    f"slice:       {args.name} {now}{in_state}",
    f"step:        {step}/{total or '?'} (seen {_ago(seen_at)}), "
    f"last checkpoint {progress['checkpoint']}",
    f"restarts:    {state.get('restarts', 0)} of at most {state.get('max_restarts', '?')}",
    f"eta:         {eta}",
  ]
  if crash := state.get("crash"):
    lines.append(
      f"crashes:     {crash['count']} at checkpoint {crash['checkpoint']}, the last "
      f"{_ago(crash['at'])} (a second one there without a new checkpoint stops the supervisor)"
    )
  install = state.get("install", {})
  if install.get("failures"):
    lines.append(
      f"install:     failed {install['failures']} times in a row, the last {_ago(install['at'])}: "
      f"{install['error']}"
    )
  if events := state.get("events", []):
    last = events[-1]
    lines.append(f"last event:  {last['event']} {_ago(last['at'])}: {last['detail']}")
  if state.get("reason"):
    lines.append(f"gave up:     {state['reason']}")
  print("\n".join(lines), flush=True)


def _supervisor(workdir: str) -> str:
  """Who holds the run's lease, from its lease file: `, pid N on HOST, ...`."""
  path = os.path.join(workdir, LEASE_FILE)
  if not fileio.exists(path):
    return ""
  holder = lease.read(path)
  who = f", pid {holder['pid']} on {holder['host']}"
  if holder["released"]:
    return f"{who}, which stopped {_ago(holder['renewed_at'])}"
  late = time.time() - holder["renewed_at"] > holder["duration_s"]
  return f"{who}, heard from {_ago(holder['renewed_at'])}" + (
    " (its lease expired: is it still running?)" if late else ""
  )
