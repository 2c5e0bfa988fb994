"""Start-up checks of a config: the sizes that must agree, checked once by every entry point
before any data is read or any model is built, each error naming the fields involved.

`validate(config, mode)`, mode by what the entry point does:
  "model": the model's own sizes (all modes): latent channels of the DiT vs the VAE, image
           resolutions vs the VAE's stride x the DiT's patch, the text length;
  "train": also the training sources' feature widths vs `dit.text_dim` and each task's global
           batch vs the mesh and `microbatches`, and, with `eval.every_steps`, what "eval" checks;
  "eval":  also a non-empty `eval.splits`, their feature widths and the evaluation batch vs
           the mesh.
Feature stores given on a command line rather than in the config are checked where they are
opened (inference/genmask.py).
"""

from __future__ import annotations

import math

import jax
import ml_collections

from genmask_jax.data import tasks
from genmask_jax.data.features import FeatureReader
from genmask_jax.models.vae import spatial_stride
from genmask_jax.runtime import sharding

MODES = ("model", "train", "eval")


class ConfigError(ValueError):
  """Fields of a config disagree with each other, with the stores they name or the devices."""


def image_multiple(config: ml_collections.ConfigDict) -> int:
  """What an image side must be a multiple of: the VAE's stride x the DiT's spatial patch."""
  stride = spatial_stride(config.vae.dim_mult)
  return math.lcm(*(stride * p for p in config.dit.patch_size[1:]))


def check_model(config: ml_collections.ConfigDict) -> None:
  """The DiT reads and writes the VAE's latents, one frame per image, on whole patches."""
  z_dim = config.vae.z_dim
  for field in ("in_dim", "out_dim"):
    if config.dit[field] != z_dim:
      raise ConfigError(
        f"config: dit.{field} is {config.dit[field]}, vae.z_dim is {z_dim}: the DiT reads and "
        "writes the VAE's latents, so they must agree"
      )
  if config.dit.patch_size[0] != 1:
    raise ConfigError(
      f"config: dit.patch_size is {tuple(config.dit.patch_size)}: an image is one latent "
      "frame, so its temporal patch must be 1"
    )
  multiple = image_multiple(config)
  for task in tasks.NAMES:
    resolution = config.data[task].resolution
    if resolution % multiple:
      raise ConfigError(
        f"config: data.{task}.resolution is {resolution}, not a multiple of {multiple} (the "
        f"VAE's stride {spatial_stride(config.vae.dim_mult)} from vae.dim_mult "
        f"{tuple(config.vae.dim_mult)} x dit.patch_size {tuple(config.dit.patch_size[1:])})"
      )
  if config.data.text_len < 1:
    raise ConfigError(f"config: data.text_len is {config.data.text_len}; it must be positive")


def check_features(config: ml_collections.ConfigDict, field: str, features_dir: str) -> None:
  """The feature store `features_dir` (config field `field`) holds `dit.text_dim` wide texts."""
  width = FeatureReader(features_dir).meta.hidden_size
  if width != config.dit.text_dim:
    raise ConfigError(
      f"config: {field} {features_dir} holds text features of width {width}, dit.text_dim is "
      f"{config.dit.text_dim}: set --config.dit.text_dim={width} (the encoder's width), or "
      f"encode the store with a VLM of width {config.dit.text_dim}"
    )


def mesh_axes(
  config: ml_collections.ConfigDict, num_devices: int | None = None, num_slices: int | None = None
) -> dict[str, int]:
  """The sizes of the mesh `config.mesh` gives on this job's devices (default), or on a target's
  `num_devices` devices in `num_slices` slices."""
  try:
    if num_devices is None:
      devices = jax.devices()
      num_devices, num_slices = len(devices), sharding.device_slices(config.mesh, devices)
    return sharding.global_shape(config.mesh, num_devices, num_slices)
  except ValueError as e:
    raise ConfigError(f"config: mesh {config.mesh.to_dict()}: {e}") from e


def check_batch(
  config: ml_collections.ConfigDict,
  field: str,
  global_batch: int,
  parts: int = 1,
  num_devices: int | None = None,
  num_slices: int | None = None,
) -> None:
  """A global batch of `global_batch` rows (from `field`), in `parts` microbatches, splits over
  the mesh's batch axes on this job's devices (default) or on a target's `num_devices` devices in
  `num_slices` slices."""
  shape = mesh_axes(config, num_devices, num_slices)
  shards = math.prod(shape[axis] for axis in sharding.BATCH_AXES)
  if global_batch % (shards * parts):
    into = f" in {parts} microbatches (config.microbatches)" if parts > 1 else ""
    devices = math.prod(shape.values())
    raise ConfigError(
      f"config: {field} gives a global batch of {global_batch}, which does not split over the "
      f"{shards} batch shards of the mesh {shape} (data x fsdp over {devices} devices){into}: "
      f"use a multiple of {shards * parts}"
    )


def _check_evaluation(config: ml_collections.ConfigDict, mode: str) -> None:
  if not config.eval.splits:
    when = "--mode=eval" if mode == "eval" else f"eval.every_steps={config.eval.every_steps}"
    raise ConfigError(
      f"config: eval.splits is empty, so {when} has nothing to evaluate; give the splits "
      "(dict(name=, records=, features=)) in the config"
    )
  for i, split in enumerate(config.eval.splits):
    check_features(config, f"eval.splits[{i}].features", split["features"])
  per_process = config.eval.batch_size
  check_batch(
    config,
    f"eval.batch_size ({per_process} per process x {jax.process_count()} processes)",
    per_process * jax.process_count(),
  )


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
  """Raises ConfigError naming the fields that disagree (see the module docstring)."""
  if mode not in MODES:
    raise ValueError(f"mode {mode!r} unknown; expected one of {MODES}")
  check_model(config)
  if mode == "train":
    for task in tasks.NAMES:
      data = config.data[task]
      for i, source in enumerate(data.sources):
        check_features(config, f"data.{task}.sources[{i}].features", source["features"])
      if task == tasks.NAMES[tasks.SEGMENTATION] or data.sources:  # Segmentation always trains.
        check_batch(
          config, f"data.{task}.global_batch_size", data.global_batch_size, config.microbatches
        )
  if mode == "eval" or (mode == "train" and config.eval.every_steps):
    _check_evaluation(config, mode)
