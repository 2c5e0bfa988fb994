"""The trainer on fake CPU devices: FSDP sharding, multi-process, exact resume after SIGKILL."""

import json
import os
import shutil
import signal
import sys
import tempfile

import jax
import numpy as np
import pytest
from conftest import fake_devices
from flax import linen as nn
from processes import PORT_TAKEN, Processes, free_port, wait
from train_config import get_config
from training_data import make_stores

from genmask_jax.models.genmask import Models
from genmask_jax.runs import checkpoints
from genmask_jax.runtime import sharding
from genmask_jax.training import train
from genmask_jax.training.optimizer import make_optimizer

ENV = dict(os.environ, PYTHONPATH=".:tests", JAX_PLATFORMS="cpu")


def cli(root, workdir, devices=8, *overrides):
  env = dict(ENV, XLA_FLAGS=fake_devices(devices))
  command = [sys.executable, "-m", "genmask_jax.main", f"--config=tests/train_config.py:{root}"]
  return command + [f"--workdir={workdir}", *overrides], env


def run_cli(root, workdir, devices=8, *overrides) -> None:
  """The training CLI to its end; a hang fails after STALL_S seconds with no output."""
  command, env = cli(root, workdir, devices, *overrides)
  workdir = str(workdir).rstrip("/")
  fd, log = tempfile.mkstemp(".log", os.path.basename(workdir) + "-", os.path.dirname(workdir))
  os.close(fd)
  with Processes() as processes:
    process = processes.start(command, log, env=env)
    wait([process], [log, workdir])
    assert process.wait() == 0, processes.log(process)[-3000:]


def losses(workdir) -> dict[int, float]:
  """Per-step loss; a step run twice (before and after a restart) keeps its last value."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def final_params(workdir, config):
  mesh = sharding.make_mesh(config.mesh)
  models = Models.from_config(config)
  boxed = jax.eval_shape(models.init_params, jax.random.key(0))
  abstract, _ = sharding.abstract_with_shardings(boxed, mesh, sharding.rules())
  ckpt = checkpoints.TrainCheckpoints(os.path.join(workdir, "checkpoints"), keep=1, every=1)
  params = ckpt.restore_params(ckpt.latest_step(), abstract)
  ckpt.close()
  return jax.device_get(params)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """The sample and feature stores, built here once: worker processes that each found them
  missing would all write them at once."""
  root = str(tmp_path_factory.mktemp("stores"))
  make_stores(root)
  return root


@pytest.fixture(scope="module")
def sharded_run(root, tmp_path_factory):
  """The reference: 8 fake devices, mesh (data=2, fsdp=4), 8 steps, evaluated at step 8."""
  workdir = str(tmp_path_factory.mktemp("sharded"))
  run_cli(
    root, workdir, 8, "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.eval.every_steps=8"
  )
  return workdir


def test_state_is_fsdp_sharded(root):
  config = get_config(root)
  config.mesh = dict(data=2, fsdp=4, tensor=1)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules()
  models, optimizer = Models.from_config(config), make_optimizer(config.optimizer)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = train.initial_train_state(models, config, optimizer, mesh, rules)
  adam = state.opt_state[1][0]
  trees = {"params": state.params, "mu": adam.mu, "nu": adam.nu}
  large = 0
  for name, tree in trees.items():
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      if x.size >= 4096:
        large += 1
        shard = x.addressable_shards[0].data
        assert shard.size * 4 == x.size, (name, jax.tree_util.keystr(path), x.sharding.spec)
  assert large >= 30


def test_sharded_losses_match_single_device(root, sharded_run, tmp_path):
  single = str(tmp_path / "single")
  run_cli(root, single, 1)
  sharded, one = losses(sharded_run), losses(single)
  assert sorted(sharded) == list(range(1, 9))
  np.testing.assert_allclose(
    [sharded[s] for s in sorted(one)], [one[s] for s in sorted(one)], atol=1e-5
  )
  assert one[8] < one[1]  # It learns.


def run_workers(root, workdir, n, slices=1) -> list[str]:
  """tests/multiprocess_worker.py as `n` processes of one run (in `slices` slices): the
  coordinator's port chosen by the OS, and chosen again if another process took it before the
  coordinator bound it. Returns the processes' logs."""
  env = dict(ENV, XLA_FLAGS=fake_devices(8 // n))
  script = "tests/multiprocess_worker.py"
  for attempt in range(3):
    shutil.rmtree(workdir, ignore_errors=True)  # Nothing of a failed attempt is resumed.
    port = free_port() if n > 1 else 0
    with Processes() as processes:
      logs = [f"{workdir}.worker{i}-attempt{attempt}.log" for i in range(n)]
      workers = [
        processes.start(
          [sys.executable, script, root, workdir, str(n), str(i), str(port), str(slices)],
          logs[i],
          env=env,
        )
        for i in range(n)
      ]
      wait(workers, [*logs, workdir])
      processes.kill()  # A failed peer leaves the others waiting: stop them too.
      outputs = [processes.log(w) for w in workers]
    if all(w.returncode == 0 for w in workers):
      return outputs
    if not any(PORT_TAKEN.search(out) for out in outputs):
      break
  failed = [out for w, out in zip(workers, outputs, strict=True) if w.returncode != 0]
  raise AssertionError((failed or outputs)[0][-3000:])


# Two processes sum across processes in another order than one process does: the losses agree
# to float32 rounding, not bitwise (measured: at most 4.8e-7 apart, as one slice or as two).
PROCESSES_ATOL = 1e-5


@pytest.mark.xdist_group("heavy")
def test_two_processes_match_one(root, tmp_path):
  """2 processes x 4 fake devices (jax.distributed on 127.0.0.1) == 1 process x 8 devices, as one
  slice (mesh data=2, fsdp=4) and as two, one per process (mesh data=1, fsdp=4, slices=2): data
  parallelism across the processes, FSDP within each."""
  # The reference runs after the pairs: less contention between the peers.
  run_workers(root, str(tmp_path / "two"), 2)
  sliced = run_workers(root, str(tmp_path / "slices"), 2, slices=2)
  run_workers(root, str(tmp_path / "one"), 1)
  for log in sliced:  # Each data index of the mesh is one process's 4 devices.
    assert "mesh processes by data index: [[0], [1]]" in log
  one_losses = losses(tmp_path / "one")
  for run in ("two", "slices"):
    run_losses = losses(tmp_path / run)
    assert sorted(run_losses) == [1, 2, 3, 4]  # Only process 0 logs: one line per step.
    with open(tmp_path / run / "metrics.jsonl") as f:
      assert len(f.readlines()) == 4
    np.testing.assert_allclose(
      [run_losses[s] for s in one_losses], list(one_losses.values()), atol=PROCESSES_ATOL
    )


def test_evaluation_during_training(sharded_run):
  with open(os.path.join(sharded_run, "eval", "step_8", "results.json")) as f:
    assert json.load(f)["synthetic_train"]["samples"] == 32
  with open(os.path.join(sharded_run, "metrics.jsonl")) as f:
    rows = [r for r in map(json.loads, f) if "eval/synthetic_train/gIoU" in r]
  assert [r["step"] for r in rows] == [8]


def test_eval_mode_scores_the_latest_checkpoint(root, sharded_run):
  run_cli(root, sharded_run, 8, "--mode=eval", "--config.mesh.data=2", "--config.mesh.fsdp=4")
  with open(os.path.join(sharded_run, "eval", "results.json")) as f:
    results = json.load(f)["synthetic_train"]
  # The latest checkpoint is step 8, which the training run evaluated with the same code and
  # mesh: every metric agrees (an older checkpoint, other weights or other samples would not).
  with open(os.path.join(sharded_run, "eval", "step_8", "results.json")) as f:
    at_step_8 = json.load(f)["synthetic_train"]
  assert results.keys() == at_step_8.keys() and results["samples"] == 32
  for metric, value in at_step_8.items():
    assert results[metric] == pytest.approx(value, abs=1e-6), metric
  assert os.path.exists(os.path.join(sharded_run, "eval", "synthetic_train_overlays.png"))


def test_resume_after_sigkill_is_exact(root, sharded_run, tmp_path):
  """Kill -9 mid-run, restart the same command: same final parameters and the same data order."""
  workdir = str(tmp_path / "killed")
  command, env = cli(root, workdir, 8, "--config.mesh.data=2", "--config.mesh.fsdp=4")
  checkpoints = os.path.join(workdir, "checkpoints")
  reached = lambda: os.path.isdir(checkpoints) and {"2", "4"} <= set(os.listdir(checkpoints))
  log = str(tmp_path / "killed.log")
  with Processes() as processes:
    process = processes.start(command, log, env=env)
    # Polled every 20 ms: steps 5 to 8 take far longer, so the kill lands mid-run.
    wait([process], [log, workdir], until=reached, poll_s=0.02)
    assert process.poll() is None, "run ended before the kill:\n" + processes.log(process)[-3000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
  assert process.returncode == -signal.SIGKILL
  assert "8" not in os.listdir(checkpoints)  # Killed mid-run.

  run_cli(root, workdir, 8, "--config.mesh.data=2", "--config.mesh.fsdp=4")
  assert losses(workdir) == losses(sharded_run)  # Bitwise: the same batches in the same order.
  config = get_config(root)
  config.mesh = dict(data=2, fsdp=4, tensor=1)
  resumed, straight = final_params(workdir, config), final_params(sharded_run, config)
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(root, tmp_path):
  config = get_config(root)
  config.optimizer.lr = 1e6  # Diverges within a few steps.
  config.optimizer.grad_clip = 1e9
  config.checkpoint.async_save = False
  workdir = str(tmp_path / "nan")
  with pytest.raises(train.NonFiniteError, match=r"step (\d+): non-finite") as error:
    train.train(config, workdir)
  bad_step = int(error.value.args[0].split()[1].rstrip(":"))
  ckpt = checkpoints.TrainCheckpoints(os.path.join(workdir, "checkpoints"), keep=1, every=1)
  assert ckpt.latest_step() < bad_step
  ckpt.close()
  config.mesh = dict(data=1, fsdp=-1, tensor=1)
  params = final_params(workdir, config)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize("segmentation_loss", ["vae_bce", "linear_bce"])
def test_bce_formats_train_and_evaluate(root, tmp_path, segmentation_loss):
  """The paper's BCE formats through the real step (generation sub-batches carry no masks) and
  evaluation, with a three-stage VAE (stride 4) so the linear head's size follows the VAE."""
  config = get_config(root)
  config.diffusion.segmentation_loss = segmentation_loss
  config.segment.decoder = "linear" if segmentation_loss == "linear_bce" else "vae"
  config.vae.dim_mult = (1, 2, 4)
  config.total_steps, config.eval.every_steps = 2, 2
  config.checkpoint.async_save = False
  config.mesh = dict(data=1, fsdp=-1, tensor=1)
  workdir = str(tmp_path / segmentation_loss)
  train.train(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  steps = [r for r in records if "loss/segmentation" in r]
  assert len(steps) == 2 and all(np.isfinite(r["loss"]) for r in steps)
  assert any(k.startswith("eval/synthetic_train/gIoU") for r in records for k in r)


def test_resume_with_another_state_layout_names_the_checkpoint(root, tmp_path):
  config = get_config(root)
  config.total_steps = 2
  config.checkpoint.async_save = False
  config.mesh = dict(data=1, fsdp=-1, tensor=1)
  workdir = str(tmp_path / "layout")
  train.train(config, workdir)
  config.total_steps = 3  # The linear-BCE format adds a mask head to the trained parameters.
  config.diffusion.segmentation_loss, config.segment.decoder = "linear_bce", "linear"
  with pytest.raises(ValueError, match=r"segmentation_loss is 'mse' in the run, 'linear_bce' here"):
    train.train(config, workdir)
