"""The README's error paths that no other test reaches: mesh sizes, training data configs, a
model with neither a checkpoint nor converted weights, a non-finite gradient under a finite loss.
"""

import math
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest
from train_config import get_config

from genmask_jax.data import pipeline
from genmask_jax.models.genmask import Models
from genmask_jax.runs import model
from genmask_jax.runtime import sharding
from genmask_jax.training import train


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  return get_config(str(tmp_path_factory.mktemp("stores")))


@pytest.mark.parametrize(
  "sizes, devices, message",
  [
    ((-1, -1, 1), 8, r"mesh sizes \[-1, -1, 1\]: at most one -1"),
    ((3, -1, 1), 8, r"mesh sizes \[3, -1, 1\] do not divide 8 devices"),
    ((2, 2, 1), 8, r"mesh sizes \[2, 2, 1\] need 4 devices, found 8"),
  ],
)
def test_mesh_sizes_that_do_not_fit_the_devices(sizes, devices, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(sizes, devices)
  assert math.prod(sharding.mesh_shape((2, -1, 1), devices)) == devices  # A fitting one.


def _data(config, **changes):
  data = config.data.copy_and_resolve_references()
  for path, value in changes.items():
    task, key = path.split(".")
    data[task][key] = value
  return data


def test_empty_sources(config):
  with pytest.raises(ValueError, match=r"data\.segmentation\.sources is empty"):
    pipeline.train_dataset(_data(config, **{"segmentation.sources": []}), _no_sharding())


def test_latent_stores_on_some_sources_only(config):
  source = dict(config.data.segmentation.sources[0])
  mixed = [dict(source, latents="/nowhere/latents"), source]
  with pytest.raises(ValueError, match=r"every source of data\.segmentation a latent store"):
    pipeline.train_dataset(_data(config, **{"segmentation.sources": mixed}), _no_sharding())


def test_task_batch_sizes_differ(config):
  with pytest.raises(ValueError, match="mixed 1:1, global batch sizes must agree"):
    pipeline.train_dataset(_data(config, **{"generation.global_batch_size": 4}), _no_sharding())


def test_global_batch_that_does_not_split_over_the_processes(config):
  shard = grain.sharding.ShardOptions(shard_index=0, shard_count=3)
  with pytest.raises(ValueError, match="global_batch_size 8 does not split over 3 processes"):
    pipeline.train_dataset(config.data, shard)


def _no_sharding():
  return grain.sharding.NoSharding()


def test_no_checkpoint_and_no_weights(config, tmp_path):
  config = config.copy_and_resolve_references()
  config.init.weights = None
  config.mesh = dict(data=1, fsdp=-1, tensor=1)
  models = Models.from_config(config)
  mesh, rules = sharding.make_mesh(config.mesh, jax.devices()[:1]), sharding.rules()
  with pytest.raises(FileNotFoundError, match="no training checkpoint under .* no converted"):
    model.restore_params(config, str(tmp_path / "empty_run"), models, mesh, rules)


@pytest.mark.parametrize("grad_norm", [np.inf, np.nan])
def test_non_finite_gradient_with_a_finite_loss_stops(grad_norm):
  """A finite loss does not vouch for the update: an overflowing gradient stops the run too."""
  metrics = {"loss": 0.25, "loss/segmentation": 0.2, "grad_norm": grad_norm}
  with pytest.raises(train.NonFiniteError, match=r"step 7: non-finite \{'grad_norm'"):
    train.check_finite(7, metrics)
  train.check_finite(7, dict(metrics, grad_norm=1.5))  # Finite: goes on.


def test_eval_mode_without_splits_is_refused_before_writing_results(tmp_path):
  """It used to print an empty table and overwrite results.json with {}."""
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "genmask_jax.main", "--mode=eval", f"--workdir={workdir}"]
  command.append("--config=configs/genmask.py:tiny")  # No splits, as the default config.
  result = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "config: eval.splits is empty, so --mode=eval has nothing to evaluate" in result.stderr
  assert not (workdir / "eval").exists()
