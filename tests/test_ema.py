"""The weights' moving average (config.optimizer.ema_decay): kept in the train state, saved with
it, and the weights evaluation and inference use."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_config import get_config

from genmask_jax.models.genmask import Models
from genmask_jax.runs import checkpoints, model
from genmask_jax.runtime import sharding
from genmask_jax.training import train
from genmask_jax.training.optimizer import ema_update


def test_ema_update_ramps_its_decay_up():
  ema, params = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
  first = ema_update(ema, params, 0.99, jnp.int32(0))["w"]
  np.testing.assert_allclose(first, 0.9)  # min(0.99, 1 / 10) early on.
  late = ema_update(ema, params, 0.99, jnp.int32(10_000))["w"]
  np.testing.assert_allclose(late, 0.01, rtol=1e-5)


def config_with_ema(root: str, decay: float):
  config = get_config(root)
  config.optimizer.ema_decay = decay
  config.total_steps, config.eval.every_steps = 2, 0
  config.checkpoint = dict(every=1, keep=10, async_save=False)
  config.mesh = dict(data=1, fsdp=-1, tensor=1)
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ema")
  config, workdir = config_with_ema(str(tmp / "stores"), 0.9), str(tmp / "run")
  train.train(config, workdir)
  return config, workdir


def saved(config, workdir: str, step: int, item: str):
  models, mesh = Models.from_config(config), sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.get("sharding"))
  abstract, _ = sharding.abstract_with_shardings(
    jax.eval_shape(models.init_params, jax.random.key(0)), mesh, rules
  )
  ckpt = checkpoints.TrainCheckpoints(os.path.join(workdir, "checkpoints"), keep=1, every=1)
  try:
    return ckpt.restore_params(step, abstract, item)
  finally:
    ckpt.close()


def test_training_keeps_the_moving_average_in_its_checkpoints(trained):
  config, workdir = trained
  ema_1, ema_2 = (saved(config, workdir, s, "ema_params") for s in (1, 2))
  params_2 = saved(config, workdir, 2, "params")
  want = ema_update(ema_1, params_2, 0.9, jnp.int32(1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ema_2, want)
  # The average lags the weights: rate min(0.9, 2 / 11) keeps 82% of the step-1 average.
  diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), ema_2, params_2)
  assert max(jax.tree.leaves(diffs)) > 1e-6


def test_inference_restores_the_moving_average_and_refuses_it_where_none_was_kept(
  trained, tmp_path
):
  config, workdir = trained
  models, mesh = Models.from_config(config), sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.get("sharding"))
  params, _ = model.restore_params(config, workdir, models, mesh, rules)
  jax.tree.map(np.testing.assert_array_equal, params, saved(config, workdir, 2, "ema_params"))

  plain = config_with_ema(str(tmp_path / "stores"), 0.0)
  plain.total_steps = 1
  train.train(plain, str(tmp_path / "plain"))
  plain.optimizer.ema_decay = 0.9
  with pytest.raises(ValueError, match="holds no 'ema_params'"):
    model.restore_params(plain, str(tmp_path / "plain"), models, mesh, rules)
