"""Gradient accumulation (config.microbatches): the whole batch's update in parts."""

import flax.linen as nn
import jax
import numpy as np

from configs.genmask import get_config
from genmask_jax.models.genmask import Models
from genmask_jax.runs.model import frozen_vae_params
from genmask_jax.runtime import sharding
from genmask_jax.training import train
from genmask_jax.training.optimizer import make_optimizer

RESOLUTION, TEXT_LEN, BATCH = 32, 8, 8


def setup(microbatches: int):
  config = get_config("tiny")
  config.microbatches = microbatches
  config.data.text_len = TEXT_LEN
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:2])  # The batch over fsdp = 2.
  return config, mesh, Models.from_config(config), make_optimizer(config.optimizer)


def host_batch(config) -> dict:
  rng = np.random.default_rng(0)
  image = lambda: rng.uniform(-1, 1, (BATCH, RESOLUTION, RESOLUTION, 3)).astype(np.float32)
  text = lambda: rng.standard_normal((BATCH, TEXT_LEN, config.dit.text_dim)).astype(np.float32)
  text_mask = np.arange(TEXT_LEN)[None] < rng.integers(1, TEXT_LEN + 1, (BATCH, 1))
  mask = rng.integers(0, 2, (BATCH, RESOLUTION, RESOLUTION)).astype(np.uint8)
  return {
    "segmentation": dict(image=image(), mask=mask, text=text(), text_mask=text_mask),
    "generation": dict(image=image(), text=text(), text_mask=text_mask),
  }


def test_accumulated_gradients_are_the_mean_of_the_parts():
  """Two microbatches of 4 + 4 samples: the gradients and losses are the means of those of the
  interleaved halves (rows 0, 2, ... and 1, 3, ...), each with the step's key folded with its
  index."""
  config, mesh, models, optimizer = setup(2)
  rules = sharding.DEFAULT_RULES
  rng = jax.random.key(3)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = train.initial_train_state(models, config, optimizer, mesh, rules)
    vae = frozen_vae_params(models, config, mesh, rules)
    batch = host_batch(config)
    accumulate = jax.jit(lambda p, v, b: train.accumulated_gradients(models, config, p, v, b, rng))
    grads, metrics = accumulate(state.params, vae, train.device_batch(batch, mesh))
    parts = []
    for i in range(2):
      half = jax.tree.map(lambda x, i=i: x[i::2], batch)
      part = jax.jit(
        lambda p, v, b, i=i: train.batch_gradients(
          models, config, p, v, b, jax.random.fold_in(rng, i)
        )
      )
      parts.append(part(state.params, vae, train.device_batch(half, mesh)))
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *parts)
  np.testing.assert_allclose(metrics["loss"], mean[1]["loss"], rtol=1e-5)
  assert set(metrics) == set(mean[1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7), grads, mean[0])
