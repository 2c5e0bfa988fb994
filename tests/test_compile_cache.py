"""The persistent compilation cache in the work directory: a restarted training loads its step
instead of compiling it again, on local disk and on gs:// (the GCS emulator)."""

import os
import re
import subprocess
import sys
import time

import pytest
from conftest import fake_devices
from processes import Processes
from training_data import make_stores

from genmask_jax.runtime import fileio

# The tests' shared cache (conftest) would answer instead of the work directory's.
ENV = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
ENV.update(PYTHONPATH=".:tests", JAX_PLATFORMS="cpu", XLA_FLAGS=fake_devices(2))
STEP_LOG = re.compile(r"train step (compiled|loaded from the compilation cache) in ([\d.]+) s")


def command(root: str, workdir: str) -> list[str]:
  return [
    sys.executable, "-m", "genmask_jax.main", f"--config=tests/train_config.py:{root}",
    f"--workdir={workdir}", "--config.checkpoint.every=2",
  ]  # fmt: skip


def train_step_log(log: str) -> tuple[str, float]:
  """(how the train step was obtained, seconds) from a training's log."""
  (match,) = STEP_LOG.findall(log)
  return match[0], float(match[1])


def committed(workdir: str) -> bool:
  directory = f"{workdir}/checkpoints"
  return fileio.isdir(directory) and any(
    n.isdigit() and fileio.exists(f"{directory}/{n}/commit_success.txt")
    for n in fileio.listdir(directory)
  )


@pytest.mark.parametrize("storage", ["local", "gcs"])
def test_restart_loads_the_train_step_from_the_cache(storage, tmp_path, request):
  """The training is killed after its first checkpoint, then started again with the same
  command (a preempted job): the restart loads the step that the first start compiled."""
  root = str(tmp_path / "stores")
  make_stores(root)
  env = dict(ENV)
  if storage == "gcs":
    gcs = request.getfixturevalue("gcs")
    workdir = gcs.create_bucket(f"cache-{os.getpid()}") + "/run"
    env.update(gcs.env)
  else:
    workdir = str(tmp_path / "run")
  with Processes() as processes:
    first = processes.start(command(root, workdir), tmp_path / "first.log", env=env)
    while not committed(workdir):
      assert first.poll() is None, processes.log(first)[-3000:]
      time.sleep(0.2)
    first.kill()
    first_log = processes.log(first)
  result = subprocess.run(command(root, workdir), env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  first_step, restart = train_step_log(first_log), train_step_log(result.stderr)
  print(f"{storage}: first start {first_step}, restart {restart}")
  assert first_step[0] == "compiled" and restart[0] == "loaded from the compilation cache"
