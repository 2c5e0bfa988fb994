"""A run's model: its trained parameters, its frozen VAE, and the two programs it serves.

Parameters live in plain pytrees (models/genmask.py):
  trained  the latest training checkpoint under the workdir (the weights' moving average when
           `config.optimizer.ema_decay` > 0), or the converted weights `config.init.weights`
  VAE      the converted weights `config.init.vae_weights`, or a random initialization seeded
           by `vae_init_seed`; `vae_fingerprint` hashes its settings and parameters, which run
           records and latent stores keep to refuse another VAE
`load` puts both on the run's mesh. Programs, jitted: `segmenter` (one-step segmentation of a
batch, as evaluation scores it) and `generator` (Euler sampling with classifier-free guidance,
then the VAE decoder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from genmask_jax.conversion import weights
from genmask_jax.diffusion import generate, segment
from genmask_jax.models.genmask import Models
from genmask_jax.models.vae import WanVAE
from genmask_jax.runs.checkpoints import TrainCheckpoints
from genmask_jax.runtime import fileio, sharding


def vae_init_seed(config: ml_collections.ConfigDict) -> int | None:
  """The seed of the frozen VAE's random initialization; None when it has converted weights."""
  return None if config.init.vae_weights else config.seed + 1


def frozen_vae_params(models: Models, config: ml_collections.ConfigDict, mesh, rules) -> Any:
  """The VAE's parameters in their shardings: converted weights (`config.init.vae_weights`)
  or, when empty, a seeded random initialization (`vae_init_seed`)."""
  abstract, shardings = sharding.abstract_with_shardings(models.abstract_vae_params(), mesh, rules)
  if config.init.vae_weights:
    return weights.restore(config.init.vae_weights, "vae", abstract)
  init = jax.jit(
    lambda rng: sharding.strip_axis_names(models.init_vae_params(rng)), out_shardings=shardings
  )
  return init(jax.random.key(vae_init_seed(config)))


def vae_fingerprint(vae: WanVAE, vae_params: Any) -> str:
  """A hash of the VAE module's settings (architecture, dtype, latent statistics) and of its
  parameters; the same on every process of a multi-host job."""
  fields = [f.name for f in dataclasses.fields(vae) if f.name not in ("parent", "name")]
  settings = {name: getattr(vae, name) for name in fields}
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(vae_params)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
    leaf = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)} {leaf.dtype} {leaf.shape}".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def vae_identity(config: ml_collections.ConfigDict, fingerprint: str) -> dict:
  """Where the frozen VAE comes from, and its fingerprint (run.json's `vae`)."""
  vae_weights = config.init.vae_weights
  return {
    "weights": fileio.absolute(vae_weights) if vae_weights else "",
    "random_init_seed": vae_init_seed(config),
    "fingerprint": fingerprint,
  }


def describe_vae(identity: Mapping) -> str:
  if identity.get("weights"):
    return f"weights {identity['weights']}"
  return f"a random initialization (seed {identity.get('random_init_seed')})"


def latest_step(workdir: str) -> int | None:
  """The step of the latest training checkpoint under `workdir`; None when there is none."""
  directory = os.path.join(workdir, "checkpoints")
  if not fileio.isdir(directory):
    return None
  ckpt = TrainCheckpoints(directory, keep=1, every=1, async_save=False)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def restore_params(config: ml_collections.ConfigDict, workdir: str, models: Models, mesh, rules):
  """(trained params, step) in their shardings: those of the latest training checkpoint under
  `workdir`, else the converted weights `config.init.weights` (step None)."""
  abstract, _ = sharding.abstract_with_shardings(models.abstract_params(), mesh, rules)
  step = latest_step(workdir)
  if step is not None:
    directory = os.path.join(workdir, "checkpoints")
    ckpt = TrainCheckpoints(directory, keep=1, every=1, async_save=False)
    item = "ema_params" if config.optimizer.get("ema_decay", 0.0) else "params"
    params = ckpt.restore_params(step, abstract, item)
    ckpt.close()
    logging.info("model: %s of step %d under %s", item, step, directory)
    return params, step
  if not config.init.weights or models.mask_head is not None:
    raise FileNotFoundError(
      f"no training checkpoint under {os.path.join(workdir, 'checkpoints')} and no converted "
      "weights (config.init.weights) to run the model with"
    )
  logging.info("model: converted weights %s (no training checkpoint)", config.init.weights)
  return {"dit": weights.restore(config.init.weights, "dit", abstract["dit"])}, None


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A run's model in memory: modules, weights, and the mesh and rules they are sharded by."""

  models: Models
  params: Any
  vae_params: Any
  step: int | None  # The checkpoint's step; None for converted weights.
  mesh: jax.sharding.Mesh
  rules: Any


def load(
  config: ml_collections.ConfigDict, workdir: str, devices: Sequence[jax.Device] | None = None
) -> Loaded:
  """The trained parameters (`restore_params`) and the frozen VAE, on the mesh of
  `config.mesh` over `devices` (default: all)."""
  mesh = sharding.make_mesh(config.mesh, *([devices] if devices else []))
  rules = sharding.rules(config.get("sharding"))
  models = Models.from_config(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params, step = restore_params(config, workdir, models, mesh, rules)
    vae_params = frozen_vae_params(models, config, mesh, rules)
  return Loaded(models, params, vae_params, step, mesh, rules)


def gathers_weights(config: ml_collections.ConfigDict) -> bool:
  """`config.generate.gather_weights`: whether the sampler gathers the DiT's weights before its
  loop. A run recorded before the field samples with them sharded, as it did."""
  return config.generate.get("gather_weights", False)


def segmenter(models: Models, config: ml_collections.ConfigDict) -> Callable:
  """jit(params, vae_params, images (B, R, R, 3), text, text_mask) -> mask logits (B, R, R)."""

  @jax.jit
  def run(params, vae_params, images, text, text_mask):
    return segment.segment(
      models.velocity,
      params,
      models.encode(vae_params, images),
      text,
      text_mask,
      config=config.segment,
      vae_params=vae_params,
      vae_mask_logits=models.vae_mask_logits,
    )

  return run


def generator(models: Models, config: ml_collections.ConfigDict) -> Callable:
  """jit(params, vae_params, noise (B, 1, h, w, z_dim), text, text_mask, guidance_scale) ->
  images (B, s h, s w, 3) in [-1, 1], s the VAE's stride. With `config.generate.gather_weights`
  the DiT's weights are gathered over fsdp before the Euler loop."""

  @jax.jit
  def run(params, vae_params, noise, text, text_mask, guidance_scale: Any):
    if gathers_weights(config):  # Once, not in each of the loop's steps.
      dit = sharding.gathered_over(params["dit"], models.abstract_params()["dit"], "fsdp")
      params = dict(params, dit=dit)
    latents = generate.generate(
      models.velocity,
      params,
      noise,
      text,
      text_mask,
      guidance_scale,
      num_steps=config.generate.num_steps,
      shift=config.generate.shift,
    )
    return models.decode(vae_params, latents[:, 0])

  return run
