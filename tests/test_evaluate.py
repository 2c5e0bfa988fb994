"""End-to-end evaluation: the same model and data give the same metrics on any device count."""

import json

import jax
import pytest
from flax import linen as nn
from PIL import Image
from train_config import get_config

from genmask_jax import evaluate, sharding
from genmask_jax.genmask import Models, frozen_vae_params


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("stores"))
  config = get_config(root)
  split = dict(name="synthetic_train", **config.data.segmentation.sources[0])
  config.eval.splits = [split]
  config.eval.num_overlays = 3
  config.eval.overlay_tile = 32
  models = Models.from_config(config)
  params = jax.device_get(sharding.strip_axis_names(models.init_params(jax.random.key(1))))
  return config, models, params


def run(setup, devices, batch_size, out_dir):
  config, models, params = setup
  config = config.copy_and_resolve_references()
  config.eval.batch_size = batch_size
  config.mesh = dict(data=1, fsdp=-1, tensor=1)
  mesh, rules = sharding.make_mesh(config.mesh, jax.devices()[:devices]), sharding.rules()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    vae_params = frozen_vae_params(models, config, mesh, rules)
    return evaluate.evaluate_params(models, params, vae_params, config, mesh, out_dir)


def test_same_metrics_on_1_and_8_devices_and_any_batch_size(setup, tmp_path):
  eight = run(setup, 8, 8, str(tmp_path / "eight"))  # 32 samples: 4 full batches.
  one = run(setup, 1, 5, str(tmp_path / "one"))  # 7 batches, the last padded with 3.
  assert one.keys() == eight.keys() == {"synthetic_train"}
  assert one["synthetic_train"]["samples"] == eight["synthetic_train"]["samples"] == 32
  for metric, value in eight["synthetic_train"].items():
    assert one["synthetic_train"][metric] == pytest.approx(value, abs=1e-6), metric

  with open(tmp_path / "eight" / "results.json") as f:
    assert json.load(f)["synthetic_train"]["gIoU"] == eight["synthetic_train"]["gIoU"]
  grid = Image.open(tmp_path / "eight" / "synthetic_train_overlays.png")
  assert grid.size == (3 * 32, 3 * 32)
