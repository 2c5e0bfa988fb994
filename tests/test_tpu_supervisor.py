"""Supervised pod runs and preemption notices: the real trainer on fake CPU devices, a fake gcloud
(tests/fake_gcloud.py: one queued resource whose one worker is this machine) on PATH."""

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import fake_devices
from train_config import get_config
from training_data import make_stores

from genmask_jax.models.genmask import Models
from genmask_jax.runs import checkpoints
from genmask_jax.runtime import sharding
from launch import tpu_pod
from launch.common import commands, tpu_supervisor, tpu_vm

ENV = dict(os.environ, PYTHONPATH=".:tests", JAX_PLATFORMS="cpu", XLA_FLAGS=fake_devices(8))
HANG_GUARD_S = 400  # Only against hangs: nothing here is timed.


def train_command(root, workdir) -> list[str]:
  config = f"--config=tests/train_config.py:{root}"
  return [sys.executable, "-m", "genmask_jax.main", config, f"--workdir={workdir}"]


def run_training(root, workdir) -> None:
  result = subprocess.run(
    train_command(root, workdir), env=ENV, capture_output=True, text=True, timeout=HANG_GUARD_S
  )
  assert result.returncode == 0, result.stderr[-3000:]


def losses(workdir) -> dict[int, float]:
  """Per-step loss; a step run twice (before and after a restart) keeps its last value."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def checkpoint_steps(workdir) -> list[int]:
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def final_params(workdir, root):
  config = get_config(root)
  mesh = sharding.make_mesh(config.mesh)
  boxed = jax.eval_shape(Models.from_config(config).init_params, jax.random.key(0))
  abstract, _ = sharding.abstract_with_shardings(boxed, mesh, sharding.rules())
  ckpt = checkpoints.TrainCheckpoints(os.path.join(workdir, "checkpoints"), keep=1, every=1)
  params = ckpt.restore_params(ckpt.latest_step(), abstract)
  ckpt.close()
  return jax.device_get(params)


def assert_same_run(workdir, reference, root) -> None:
  assert losses(workdir) == losses(reference)  # Bitwise: the same batches in the same order.
  jax.tree.map(
    np.testing.assert_array_equal, final_params(workdir, root), final_params(reference, root)
  )


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("stores"))
  make_stores(root)
  return root


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
  """The uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  run_training(root, workdir)
  return workdir


def wait_for(condition, process: subprocess.Popen) -> None:
  deadline = time.monotonic() + HANG_GUARD_S
  while not condition():
    assert process.poll() is None, f"exited early with {process.returncode}"
    assert time.monotonic() < deadline, "hang guard"
    time.sleep(0.02)


def end(process: subprocess.Popen) -> None:
  if process.poll() is None:
    process.kill()
    process.wait()


def saving(workdir) -> int | None:
  """The step whose checkpoint Orbax is writing (its temporary folder exists), if any."""
  folder = os.path.join(workdir, "checkpoints")
  names = os.listdir(folder) if os.path.isdir(folder) else []
  steps = [int(n.split(".")[0]) for n in names if ".orbax-checkpoint-tmp" in n]
  return steps[0] if steps else None


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_sigterm_during_a_save_checkpoints_the_current_step_and_exits_0(root, reference, tmp_path):
  """The notice comes while a checkpoint is being written: that save completes, the step in
  flight is saved too, the process exits 0 and the resumed run is the uninterrupted one."""
  workdir = str(tmp_path / "run")
  process = subprocess.Popen(
    train_command(root, workdir), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  try:
    wait_for(lambda: saving(workdir), process)
    in_flight = saving(workdir)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)  # Cloud TPU's notice is ~30 s; CPUs are shared.
    assert process.returncode == 0, err.decode()[-3000:]
  finally:
    end(process)
  step = max(losses(workdir))
  assert saving(workdir) is None and in_flight in checkpoint_steps(workdir)
  assert checkpoint_steps(workdir)[-1] == step < 8  # The step it was on, not the last save step.
  run_training(root, workdir)
  assert_same_run(workdir, reference, root)


# --- supervise -------------------------------------------------------------------------------


class FakeCloud:
  """tests/fake_gcloud.py as `gcloud` on PATH, with its state folder; `faults`, `creates` and
  `install_failures` as its docstring describes them."""

  def __init__(self, tmp_path, faults=(), creates=(), install_failures: int = 0, env=None):
    self.dir = tmp_path / "cloud"
    bin_dir = tmp_path / "bin"
    for folder in (self.dir, bin_dir):
      folder.mkdir()
    script = os.path.join(commands.PROJECT_ROOT, "tests", "fake_gcloud.py")
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    gcloud.chmod(0o755)
    self.env = dict(
      env or ENV,
      PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
      FAKE_GCLOUD_DIR=str(self.dir),
      FAKE_GCLOUD_CHECKOUT=commands.PROJECT_ROOT,
      FAKE_GCLOUD_FAULTS=json.dumps(list(faults)),
      FAKE_GCLOUD_CREATES=json.dumps(list(creates)),
      FAKE_GCLOUD_INSTALL_FAILURES=str(install_failures),
      TMPDIR=str(tmp_path),  # The upload's local tarball.
    )

  def state(self) -> dict:
    with open(self.dir / "state.json") as f:
      return json.load(f)

  def update(self, **changes) -> None:
    """Changes the fake's state, e.g. unreachable=[1]: worker 1's ssh fails from now on."""
    state = self.state()
    state.update(changes)
    (self.dir / "state.json").write_text(json.dumps(state))

  def verbs(self) -> list[str]:
    return [c[3] for c in self.state()["calls"]]

  def log(self, worker: int) -> str:
    return (self.dir / "home" / str(worker) / "genmask-jax-train.log").read_text()

  def kill_all(self) -> None:
    """Every process the fake started (trainings, fault injectors), by pid, if still ours."""
    if not (self.dir / "state.json").exists():
      return
    pids = list(self.state()["pids"])
    for pid_file in (self.dir / "home").glob("*/genmask-jax-train.pid"):
      with contextlib.suppress(OSError, ValueError):
        pids.append(int(pid_file.read_text()))
    for pid in pids:
      with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
          cmdline = f.read()
        if b"genmask_jax.main" in cmdline or b"fake_gcloud.py" in cmdline:
          os.kill(pid, signal.SIGKILL)


NOTICE_AT_CHECKPOINT = {"kind": "notice", "when": "checkpoint"}
NOTICE_AT_START = {"kind": "notice", "when": "start"}


@pytest.fixture
def source(tmp_path):
  """The checkout to upload (the fake installs the real one instead)."""
  src = tmp_path / "src"
  src.mkdir()
  (src / "requirements-train.txt").write_text("jax\n")
  return src


def supervise_argv(root, workdir, source, *extra: str, accelerator="v5p-8") -> list[str]:
  """The supervisor's command; v5p-8 is one host, v5p-16 two (two JAX processes)."""
  return [
    sys.executable,
    "-m",
    "launch.tpu_pod",
    "supervise",
    "--name=gm",
    "--zone=us-east5-a",
    "--queued",
    "--spot",
    f"--accelerator_type={accelerator}",
    f"--config=tests/train_config.py:{root}",
    f"--workdir={workdir}",
    f"--source_dir={source}",
    "--allow_local_workdir",
    "--poll_seconds=0.3",
    "--backoff_seconds=0",
    "--skip_compile_check",  # tests/test_launchers.py tests the check.
    *extra,
  ]


def supervisor_state(workdir) -> dict:
  with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
    with open(os.path.join(workdir, "supervisor.json")) as f:
      return json.load(f)
  return {}


def status_of(cloud, argv) -> str:
  """`tpu_pod status` of the run of supervise command `argv`."""
  workdir = next(a for a in argv if a.startswith("--workdir="))
  result = subprocess.run(
    [*argv[:3], "status", "--name=gm", "--zone=us-east5-a", "--queued", workdir],
    env=cloud.env,
    cwd=commands.PROJECT_ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0, result.stderr
  return result.stdout


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_supervisor_survives_two_preemptions_and_its_own_restart(root, reference, source, tmp_path):
  cloud = FakeCloud(tmp_path, faults=[NOTICE_AT_CHECKPOINT] * 2)
  workdir = str(tmp_path / "run")
  argv = supervise_argv(root, workdir, source, "--max_restarts=3")
  first = second = None
  try:
    first = subprocess.Popen(argv, env=cloud.env, cwd=commands.PROJECT_ROOT)
    # Killed once it restarted training after the first preemption.
    wait_for(
      lambda: (
        supervisor_state(workdir).get("restarts") == 1
        and supervisor_state(workdir).get("phase") == "training"
      ),
      first,
    )
    first.kill()
    first.wait()
    second = subprocess.Popen(
      argv, env=cloud.env, cwd=commands.PROJECT_ROOT, stderr=subprocess.PIPE, text=True
    )
    _, err = second.communicate(timeout=HANG_GUARD_S)
    assert second.returncode == 0, err[-3000:]
  finally:
    for process in (first, second):
      if process is not None:
        end(process)
    cloud.kill_all()

  fake = cloud.state()
  assert fake["starts"] == 3  # The second supervisor re-attached: no second training.
  assert cloud.verbs().count("create") == 3
  assert [f["exits"] for f in fake["faults"]] == [[0], [0]]  # Each checkpointed on SIGTERM.
  assert not any(f["killed_after_grace"] for f in fake["faults"])
  assert fake["slice"] == "NONE" and cloud.verbs()[-2:] == ["delete", "describe"]
  state = supervisor_state(workdir)
  assert state["phase"] == "finished" and state["restarts"] == 2
  events = [e["event"] for e in state["events"]]
  assert events.count("restart") == 2 and "re-attached" in events
  assert all("SUSPENDED" in e["detail"] for e in state["events"] if e["event"] == "restart")
  assert "finished: step 8 after 2 restarts" in err
  assert_same_run(workdir, reference, root)

  out = status_of(cloud, argv)
  assert "slice:       gm NOT_FOUND" in out and "supervisor:  finished" in out
  assert "step:        8/8" in out and "last checkpoint 8" in out
  assert "restarts:    2 of at most 3" in out and "eta:         0.0 h" in out


def run_supervisor(cloud, argv: list[str], timeout: float = HANG_GUARD_S):
  """Runs the supervisor to its end (a CompletedProcess); every process of the fake cloud is
  killed afterwards."""
  try:
    return subprocess.run(
      argv,
      env=cloud.env,
      cwd=commands.PROJECT_ROOT,
      capture_output=True,
      text=True,
      timeout=timeout,
    )
  finally:
    cloud.kill_all()


def test_supervisor_gives_up_after_max_restarts(root, source, tmp_path):
  """Preempted at every start: one restart, then a clear stop; the slice is deleted."""
  cloud = FakeCloud(tmp_path, faults=[NOTICE_AT_START] * 5)
  workdir = str(tmp_path / "run")
  argv = supervise_argv(root, workdir, source, "--max_restarts=1")
  result = run_supervisor(cloud, argv)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "[supervisor] gave up: slice SUSPENDED (preempted or lost); --max_restarts=1 reached" in (
    result.stderr
  )
  assert cloud.state()["starts"] == 2 and cloud.verbs().count("create") == 2
  # Deleted, and supervisor.json says so (it asked after the delete) and that it ended.
  assert cloud.state()["slice"] == "NONE" and cloud.verbs()[-2:] == ["delete", "describe"]
  state = supervisor_state(workdir)
  assert state["phase"] == "failed" and state["restarts"] == 1
  assert state["slice"] == "NOT_FOUND" and not state["supervisor"]["running"]


def test_supervisor_stops_when_training_fails_again_without_progress(root, source, tmp_path):
  """A crash on two workers (here: a config key that does not exist) is retried once, not
  --max_restarts times."""
  cloud = FakeCloud(tmp_path)
  workdir = str(tmp_path / "run")
  argv = supervise_argv(
    root, workdir, source, "--max_restarts=5", "--config_overrides=nope=1", accelerator="v5p-16"
  )
  result = run_supervisor(cloud, argv)
  assert result.returncode == 1, result.stderr[-3000:]
  # Each time, the first worker to fail is named (with its peer, if it had failed by then).
  tails = os.path.join(workdir, "supervisor_logs", "attempt2.log")
  assert re.search(
    r"gave up: training failed on its own before the first checkpoint, again without a new "
    r"checkpoint in between: fake-w-[01] exited 1.* \(the workers' last log lines: "
    + re.escape(tails)
    + r"\); a rebuild would fail the same way: fix what the workers' logs show, then the same "
    r"command resumes from the last checkpoint \(last checkpoint: none yet\)",
    result.stderr,
  )
  assert cloud.state()["workers"] == 2 and cloud.state()["starts"] == 2
  assert supervisor_state(workdir)["restarts"] == 1
  # The slice is gone, its logs with it; their ends were kept.
  with open(tails) as f:
    lines = f.read().splitlines()
  for worker in (0, 1):
    assert any(line.startswith(f"fake-w-{worker}: ") and "nope" in line for line in lines)


def _lines(capsys) -> list[str]:
  return capsys.readouterr().out.splitlines()


def test_supervise_dry_run_shows_one_cycle(source, capsys):
  tpu_pod.main(
    [
      "supervise",
      "--name=gm",
      "--zone=z",
      "--accelerator_type=v5p-128",
      "--queued",
      "--spot",
      "--workdir=gs://b/run",
      f"--source_dir={source}",
      "--max_restarts=4",
      "--skip_compile_check",
      "--dry_run",
    ]
  )
  lines = _lines(capsys)
  assert lines.pop(0) == "# compile check skipped (--skip_compile_check)"
  gcloud = [line.split()[3:5] for line in lines if line.startswith("gcloud")]
  assert gcloud == [
    ["queued-resources", "create"],
    ["queued-resources", "describe"],
    ["tpu-vm", "scp"],
    ["tpu-vm", "ssh"],  # Install.
    ["tpu-vm", "ssh"],  # Start, detached.
    ["queued-resources", "describe"],  # Every poll...
    ["tpu-vm", "ssh"],  # ... and the workers' probe.
    ["queued-resources", "delete"],  # On preemption, before the same create again.
    ["queued-resources", "delete"],  # At the end.
  ]
  start = [line for line in lines if "genmask_jax.main" in line]
  assert (
    len(start) == 1 and "(nohup sh -c" in start[0] and "> ../genmask-jax-train.exit" in start[0]
  )
  assert lines[0].startswith(
    "# state: gs://b/run/supervisor.json; lease: gs://b/run/supervisor.lease; progress: "
    "gs://b/run/checkpoints"
  )
  assert any("at most 4 times" in line for line in lines)
  assert any("(queued: no limit; other states: 60 min, then a rebuild)" in line for line in lines)
  assert any("an install that fails is retried at most 6 times" in line for line in lines)


def test_install_mounts_the_data_bucket_read_only(source, capsys):
  tpu_pod.main(
    [
      "install",
      "--name=gm",
      "--zone=z",
      f"--source_dir={source}",
      "--mount_bucket=gs://my-data/",
      "--mount_point=/tmp/data",
      "--dry_run",
    ]
  )
  mount = _lines(capsys)[-1]
  assert mount.startswith("gcloud compute tpus tpu-vm ssh gm --worker=all --zone=z '--command=")
  assert "command -v gcsfuse > /dev/null || {" in mount  # Installed where missing.
  assert "sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse" in mount
  assert mount.endswith(
    "mkdir -p /tmp/data && { mountpoint -q /tmp/data || gcsfuse -o ro --implicit-dirs"
    " --type-cache-max-size-mb=-1 --stat-cache-max-size-mb=-1 --metadata-cache-ttl-secs=-1"
    " --kernel-list-cache-ttl-secs=-1 my-data /tmp/data; }'"
  )


# --- faults on a slice of two workers ----------------------------------------------------------

# Worker 0's host dies once both trainings have joined jax.distributed: worker 1 then aborts
# ("JAX distributed service detected fatal errors", exit 134), as its peer on Cloud TPU does.
HOST_DEATH = {"kind": "kill", "worker": 0, "when": "log:starting at step"}


def events(workdir, kind: str) -> list[str]:
  return [e["detail"] for e in supervisor_state(workdir)["events"] if e["event"] == kind]


def test_lost_hosts_rebuild_the_slice_and_are_not_crashes(root, source, tmp_path):
  """Three host deaths before the first checkpoint: three rebuilds, up to --max_restarts; none
  counts as a crash (two crashes at one checkpoint would stop the supervisor after one)."""
  cloud = FakeCloud(tmp_path, faults=[HOST_DEATH] * 3)
  workdir = str(tmp_path / "run")
  argv = supervise_argv(root, workdir, source, "--max_restarts=2", accelerator="v5p-16")
  result = run_supervisor(cloud, argv)
  assert result.returncode == 1, result.stderr[-3000:]
  fake = cloud.state()
  # Killed; its peer aborted (SIGABRT, or SIGSEGV when the abort's teardown crashes: seen in CI).
  assert all(f["exits"][0] == 137 and f["exits"][1] in (134, 139) for f in fake["faults"])
  assert len(fake["faults"]) == 3, fake["faults"]
  assert fake["starts"] == 3 and cloud.verbs().count("create") == 3
  restarts = events(workdir, "restart")
  lost = r"lost a host \(or a notice stopped training\): fake-w-0 exited 137, fake-w-1 exited "
  lost += r"13[49] peer"
  assert len(restarts) == 2 and all(re.search(lost, r) for r in restarts), restarts
  assert "--max_restarts=2 reached after 2 restarts" in events(workdir, "gave up")[0]
  assert "crash" not in supervisor_state(workdir)


def test_stuck_slices_are_deleted_and_queued_again(root, source, tmp_path):
  """Queued past --queue_timeout (longer than --transition_timeout: the queue has its own
  deadline), then stuck PROVISIONING, then preempted and stuck SUSPENDING: each deleted and
  queued again, until --max_restarts."""
  cloud = FakeCloud(
    tmp_path,
    creates=["WAITING_FOR_RESOURCES", "PROVISIONING"],
    faults=[dict(NOTICE_AT_START, stuck=True)],
  )
  workdir = str(tmp_path / "run")
  argv = supervise_argv(
    root,
    workdir,
    source,
    "--max_restarts=2",
    "--transition_timeout=0.02",  # 1.2 s
    "--queue_timeout=0.05",  # 3 s
  )
  result = run_supervisor(cloud, argv, timeout=120)  # Today's code would wait forever.
  assert result.returncode == 1, result.stderr[-3000:]
  restarts = events(workdir, "restart")
  assert len(restarts) == 2
  assert re.search(
    r"the slice stayed WAITING_FOR_RESOURCES for 0\.\d min \(--queue_timeout", restarts[0]
  )
  assert "the slice stayed PROVISIONING for 0.0 min (--transition_timeout=0.02)" in restarts[1]
  assert (
    "the slice stayed SUSPENDING for 0.0 min (--transition_timeout=0.02); --max_restarts"
    in (events(workdir, "gave up")[0])
  )
  fake = cloud.state()
  assert fake["creates"] == 3 and fake["starts"] == 1 and fake["slice"] == "NONE"
  assert supervisor_state(workdir)["slice"] == "NOT_FOUND"


@pytest.mark.parametrize("accelerator", ["v5p-8", "v5p-16"])
def test_a_notice_before_the_first_step_exits_0_at_once(root, source, tmp_path, accelerator):
  """A notice while the trainings set up, restore or compile: nothing to save beyond the last
  checkpoint, so every worker exits 0 at once instead of running into the grace period."""
  notice = {"kind": "notice", "when": "log:starting at step"}
  cloud = FakeCloud(tmp_path, faults=[notice])
  workdir = str(tmp_path / "run")
  argv = supervise_argv(root, workdir, source, "--max_restarts=0", accelerator=accelerator)
  result = run_supervisor(cloud, argv)
  assert result.returncode == 1, result.stderr[-3000:]
  [fault] = cloud.state()["faults"]
  workers = cloud.state()["workers"]
  assert fault["exits"] == [0] * workers and not fault["killed_after_grace"]
  assert checkpoint_steps(workdir) == [] and not os.path.exists(
    os.path.join(workdir, "metrics.jsonl")
  )
  for worker in range(workers):
    log = cloud.log(worker)
    assert (
      "preemption notice before the first step (restoring or compiling): nothing to save " in log
    )
    assert "train step compiled" not in log and "loaded from the compilation cache" not in log


def test_the_probe_keeps_the_answers_of_workers_whose_ssh_worked(source, tmp_path, monkeypatch):
  """Worker 1's ssh fails (gcloud exits 255): worker 0's answer still counts, and worker 1 is
  silent, which beside a running training is only unsure, beside a killed one a lost host."""
  cloud = FakeCloud(tmp_path)
  for name, value in cloud.env.items():
    monkeypatch.setenv(name, value)
  args = tpu_pod.parse_flags(
    supervise_argv("root", str(tmp_path / "run"), source, accelerator="v5p-16")[3:]
  )
  supervisor = tpu_supervisor.Supervisor(commands.Shell(dry_run=False), args)
  shell = commands.Shell(dry_run=False)
  shell.run(tpu_vm.create_command(args))
  while supervisor.slice_state() != "ACTIVE":
    pass
  cloud.update(unreachable=[1])
  home = cloud.dir / "home" / "0"
  (home / "genmask-jax-train.pid").write_text(str(os.getpid()))  # A live process: running.
  assert supervisor.probe() == [("fake-w-0", "running"), ("a worker", "silent")]
  assert tpu_supervisor.assess(supervisor.probe())[0] == "unsure"
  (home / "genmask-jax-train.exit").write_text("137\n")
  assert supervisor.probe() == [("fake-w-0", "exited 137"), ("a worker", "silent")]
  assert tpu_supervisor.assess(supervisor.probe()) == (
    "rebuild",
    "fake-w-0 exited 137, a worker silent",
  )


def test_install_failures_are_retried_on_the_same_slice_then_stop(root, source, tmp_path):
  """A package index that stays down: the install is retried on the healthy slice (no rebuild,
  no restart used up), then the supervisor stops, naming it; `status` and supervisor.json say
  so, and that the slice is deleted."""
  cloud = FakeCloud(tmp_path, install_failures=5)
  workdir = str(tmp_path / "run")
  argv = supervise_argv(root, workdir, source, "--max_install_retries=1")
  result = run_supervisor(cloud, argv)
  assert result.returncode == 1, result.stderr[-3000:]
  assert cloud.verbs().count("create") == 1 and cloud.state()["installs"] == 2
  assert events(workdir, "install failed") == [
    "1 of at most 2 in a row: gcloud compute tpus tpu-vm ssh gm --worker=all ... exited 1; "
    "again in 0 s on the same slice"
  ]
  assert events(workdir, "gave up")[0].startswith(
    "installing failed 2 times in a row on a healthy slice: gcloud compute tpus tpu-vm ssh gm "
    "--worker=all ... exited 1; --max_install_retries=1 reached"
  )
  state = supervisor_state(workdir)
  assert state["restarts"] == 0 and state["slice"] == "NOT_FOUND" and state["phase"] == "failed"
  out = status_of(cloud, argv)
  assert "install:     failed 2 times in a row, the last" in out
  assert "supervisor:  failed, pid" in out and "which stopped" in out
  assert "slice:       gm NOT_FOUND" in out


def test_an_install_that_fails_once_uses_up_no_restart(root, source, tmp_path):
  """Installed at the second try, training starts (and crashes: a config key that does not
  exist, so that the test ends at once with --max_restarts=0)."""
  cloud = FakeCloud(tmp_path, install_failures=1)
  workdir = str(tmp_path / "run")
  argv = supervise_argv(root, workdir, source, "--max_restarts=0", "--config_overrides=nope=1")
  result = run_supervisor(cloud, argv)
  assert result.returncode == 1, result.stderr[-3000:]
  assert len(events(workdir, "install failed")) == 1 and cloud.state()["starts"] == 1
  assert "training failed on its own" in events(workdir, "gave up")[0]
  state = supervisor_state(workdir)
  assert state["restarts"] == 0 and state["install"]["failures"] == 0


@pytest.mark.parametrize("storage", ["local", "gcs"])
def test_of_two_supervisors_started_at_once_exactly_one_runs(
  root, source, tmp_path, request, storage
):
  """Both processes import everything, wait for one signal, then start supervising the same work
  directory: one claims the run (and, here, gives up on a training that cannot start), the other
  refuses, and the slice is created once."""
  env = ENV
  workdir = str(tmp_path / "run")
  if storage == "gcs":
    gcs = request.getfixturevalue("gcs")
    env = dict(ENV, **gcs.env)
    workdir = request.getfixturevalue("bucket") + "/run"
  cloud = FakeCloud(tmp_path, env=env)
  argv = supervise_argv(root, workdir, source, "--max_restarts=0", "--config_overrides=nope=1")
  go = tmp_path / "go"
  start = (
    "import os, pathlib, sys, time; from launch import tpu_pod\n"
    "pathlib.Path(sys.argv[1]).touch()\n"
    f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
    f"tpu_pod.main({argv[3:]!r})"
  )
  ready = [tmp_path / f"ready{i}" for i in range(2)]
  supervisors = []
  try:
    for flag in ready:
      supervisors.append(
        subprocess.Popen(
          [sys.executable, "-c", start, str(flag)],
          env=cloud.env,
          cwd=commands.PROJECT_ROOT,
          stderr=subprocess.PIPE,
          text=True,
        )
      )
    for process, flag in zip(supervisors, ready, strict=True):
      wait_for(flag.exists, process)
    go.touch()
    errors = [p.communicate(timeout=HANG_GUARD_S)[1] for p in supervisors]
  finally:
    for process in supervisors:
      end(process)
    cloud.kill_all()
  refused = [e for e in errors if "error: another supervisor is watching this run" in e]
  ran = [e for e in errors if "[supervisor] gave up: training failed on its own" in e]
  assert len(refused) == 1 and len(ran) == 1, errors
  assert cloud.verbs().count("create") == 1
  assert [p.returncode for p in supervisors] == [1, 1]


@pytest.mark.parametrize(
  "states, verdict",
  [
    (["running", "running"], None),
    (["exited 1", "running"], "crash"),  # Failed on its own; its peer may hang.
    (["exited 1", "exited 134 peer"], "crash"),  # JAX ended the peer: a consequence.
    (["exited 1", "exited 1"], "crash"),
    (["exited 137", "exited 134 peer"], "rebuild"),  # A host died.
    (["exited 137", "exited 1"], "rebuild"),  # Its peer failed in a collective.
    (["exited 134 peer", "running"], "rebuild"),  # The running one stopped answering JAX.
    (["exited 143", "running"], "rebuild"),
    (["exited 1", "silent"], "rebuild"),  # The silent host is the likelier cause.
    (["exited 0", "exited 0"], "rebuild"),  # A notice ended training while the slice is ACTIVE.
    (["exited 0", "running"], "unsure"),  # A notice being taken.
    (["absent", "running"], "unsure"),  # A start not visible yet.
    (["silent", "running"], "unsure"),  # One ssh failed.
    (["silent", "silent"], "unsure"),
    (["exited 1", "silent", "running"], "unsure"),
  ],
)
def test_what_the_workers_answers_call_for(states, verdict):
  workers = [(f"w{i}", state) for i, state in enumerate(states)]
  assert tpu_supervisor.assess(workers)[0] == verdict


def test_a_new_checkpoint_starts_the_crash_count_again(source, tmp_path):
  """Two crashes at one checkpoint stop the supervisor; one before and one after a new checkpoint
  do not, and nor do crashes before the first checkpoint and at the first (None is no number)."""
  workdir = tmp_path / "run"
  args = tpu_pod.parse_flags(supervise_argv("root", str(workdir), source)[3:])
  supervisor = tpu_supervisor.Supervisor(commands.Shell(dry_run=False), args)
  supervisor.load()
  supervisor.state["started_at"] = time.time()

  def checkpoint(step: int) -> None:
    folder = workdir / "checkpoints" / str(step) / "config"
    folder.mkdir(parents=True)
    (folder / "metadata").write_text(json.dumps({"total_steps": 8}))
    supervisor.update_progress()

  supervisor.update_progress()
  supervisor.crashed(None, "w0 exited 1")
  checkpoint(2)
  supervisor.crashed(2, "w0 exited 1")
  checkpoint(4)
  assert (
    supervisor.crashed(4, "w0 exited 1")
    == "training failed on its own at checkpoint 4: w0 exited 1"
  )
  assert supervisor.fatal is None and supervisor.state["crash"]["count"] == 1
  assert supervisor.crashed(4, "w0 exited 1").startswith(
    "training failed on its own at checkpoint 4, again without a new checkpoint in between"
  )
  assert supervisor.fatal is not None


@pytest.fixture(scope="module")
def reference_two_workers(root, tmp_path_factory):
  """The uninterrupted supervised run on two workers, and how long it took (s)."""
  tmp_path = tmp_path_factory.mktemp("reference_two_workers")
  src = tmp_path / "src"
  src.mkdir()
  (src / "requirements-train.txt").write_text("jax\n")
  cloud = FakeCloud(tmp_path)
  workdir = str(tmp_path / "run")
  started = time.monotonic()
  result = run_supervisor(cloud, supervise_argv(root, workdir, src, accelerator="v5p-16"))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, time.monotonic() - started


@pytest.mark.e2e
@pytest.mark.xdist_group("heavy")
def test_two_workers_survive_a_notice_a_dead_host_and_a_supervisor_kill(
  root, reference_two_workers, source, tmp_path
):
  """Faults at random moments (the seed is in the failure message): a notice in the first
  attempt, the death of worker 1's host (its ssh fails from then on) in the second, and a SIGKILL
  of the supervisor, which is started again at once. Each fault lands while the trainings start
  up (restore, compile), while a checkpoint is written, just after one, or at a random time. The
  run ends identical to the uninterrupted one."""
  reference, reference_s = reference_two_workers
  seed = int(os.environ.get("GENMASK_FAULT_SEED", time.time_ns() % 2**32))
  rng = random.Random(seed)
  during = ["log:global batch", "save", "checkpoint"]  # Each attempt has all three.
  faults = [
    {
      "kind": "notice",
      "when": rng.choice([*during, f"after:{rng.uniform(0, reference_s / 2):.1f}"]),
    },
    {"kind": "kill", "worker": 1, "unreachable": True, "when": rng.choice(during)},
  ]
  # Before the faulted run can have ended: its second attempt alone starts up again.
  kill_supervisor_at = rng.uniform(2, 0.8 * reference_s)
  cloud = FakeCloud(tmp_path, faults=faults)
  workdir = str(tmp_path / "run")
  argv = supervise_argv(root, workdir, source, "--max_restarts=4", accelerator="v5p-16")
  why = f"seed {seed}: faults {faults}, supervisor killed at {kill_supervisor_at:.1f} s"
  first = second = None
  started = time.monotonic()
  try:
    first = subprocess.Popen(argv, env=cloud.env, cwd=commands.PROJECT_ROOT)
    wait_for(lambda: time.monotonic() - started > kill_supervisor_at, first)
    first.kill()
    first.wait()
    second = subprocess.Popen(
      argv, env=cloud.env, cwd=commands.PROJECT_ROOT, stderr=subprocess.PIPE, text=True
    )
    _, err = second.communicate(timeout=3 * HANG_GUARD_S)
    assert second.returncode == 0, f"{why}\n{err[-3000:]}"
  finally:
    for process in (first, second):
      if process is not None:
        end(process)
    cloud.kill_all()
  took = time.monotonic() - started
  fake = cloud.state()
  assert [f["kind"] for f in fake["faults"]] == ["notice", "kill"], why
  state = supervisor_state(workdir)
  assert state["phase"] == "finished" and state["restarts"] == 2, why
  assert_same_run(workdir, reference, root)
  resumed = [e["step"] for e in state["events"] if e["event"] == "training"]
  print(
    f"\n{why}; attempts from checkpoints {resumed}; {took:.0f} s (uninterrupted: "
    f"{reference_s:.0f} s)"
  )
