"""The training loop's host side: metrics fetched only at log / checkpoint / evaluation steps
stop a diverging run at the same first non-finite step as fetching every step."""

import os

import pytest
from train_config import get_config

from genmask_jax.runs import checkpoints
from genmask_jax.training import train


def diverging_config(root: str, log_every: int):
  config = get_config(root)
  config.optimizer.lr = 1e6  # Diverges within a few steps.
  config.optimizer.grad_clip = 1e9
  config.checkpoint = dict(every=10, keep=10, async_save=False)
  config.total_steps, config.log_every = 12, log_every
  config.mesh = dict(data=1, fsdp=-1, tensor=1)
  return config


def first_bad_step(config, workdir: str) -> int:
  with pytest.raises(train.NonFiniteError, match=r"step (\d+): non-finite") as error:
    train.train(config, workdir)
  return int(error.value.args[0].split()[1].rstrip(":"))


def test_deferred_metrics_stop_at_the_first_non_finite_step(tmp_path):
  root = str(tmp_path / "stores")
  every_step = first_bad_step(diverging_config(root, 1), str(tmp_path / "every"))
  deferred_dir = str(tmp_path / "deferred")
  deferred = first_bad_step(diverging_config(root, 5), deferred_dir)
  assert deferred == every_step
  assert every_step % 5 != 0 and every_step < 10  # Found between fetches (log 5, save 10).
  ckpt = checkpoints.TrainCheckpoints(os.path.join(deferred_dir, "checkpoints"), keep=1, every=1)
  assert ckpt.latest_step() < every_step  # Nothing saved from a non-finite state.
  ckpt.close()
