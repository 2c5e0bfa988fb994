"""Supervised pod runs and preemption notices: the real trainer on fake CPU devices, a fake gcloud
(tests/fake_gcloud.py: one queued resource whose one worker is this machine) on PATH."""

import contextlib
import json
import os
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
from launch import commands, tpu_pod

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


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_sigterm_checkpoints_the_current_step_and_exits_0(root, reference, tmp_path):
  workdir = str(tmp_path / "run")
  process = subprocess.Popen(
    train_command(root, workdir), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  try:
    wait_for(lambda: checkpoint_steps(workdir), process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)  # Cloud TPU's notice is ~30 s; CPUs are shared.
    assert process.returncode == 0, err.decode()[-3000:]
  finally:
    end(process)
  step = max(losses(workdir))
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

  status = subprocess.run(
    [*argv[:3], "status", "--name=gm", "--zone=us-east5-a", "--queued", f"--workdir={workdir}"],
    env=cloud.env,
    cwd=commands.PROJECT_ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert status.returncode == 0, status.stderr
  out = status.stdout
  assert "slice:       gm NOT_FOUND" in out and "supervisor:  finished" in out
  assert "step:        8/8" in out and "last checkpoint 8" in out
  assert "restarts:    2 of at most 3" in out and "eta:         0.0 h" in out


def run_supervisor(cloud, argv: list[str]) -> subprocess.CompletedProcess:
  """Runs the supervisor to its end; every process of the fake cloud is killed afterwards."""
  try:
    return subprocess.run(
      argv,
      env=cloud.env,
      cwd=commands.PROJECT_ROOT,
      capture_output=True,
      text=True,
      timeout=HANG_GUARD_S,
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
  assert re.search(
    r"gave up: training failed on its own before the first checkpoint, again without a new "
    r"checkpoint in between: fake-w-[01] exited 1.*; a rebuild would fail the same way: fix what "
    r"`logs` shows, then the same command resumes from the last checkpoint \(last checkpoint: "
    r"none yet\)",
    result.stderr,
  )
  assert cloud.state()["workers"] == 2 and cloud.state()["starts"] == 2
  assert supervisor_state(workdir)["restarts"] == 1
  assert "nope" in cloud.log(0) and "nope" in cloud.log(1)


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
