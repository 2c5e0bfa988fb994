"""Compiles a config's steps for a TPU target: the project's own mesh and rules on the target's
compile-only devices, the attention kernel the target runs (splash, as Mosaic)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import ml_collections

from genmask_jax import config_check
from genmask_jax.fit import steps, targets
from genmask_jax.fit.report import StepReport, compile_step
from genmask_jax.runtime import accelerators, sharding

STEPS = ("train", "segment", "generate", "vae")


@dataclasses.dataclass(frozen=True)
class Target:
  accelerator: accelerators.Accelerator
  num_slices: int = 1

  @property
  def chips(self) -> int:
    return self.accelerator.chips * self.num_slices

  @property
  def hosts(self) -> int:
    return self.accelerator.hosts * self.num_slices

  def describe(self) -> str:
    slices = f"{self.num_slices} slices of " if self.num_slices > 1 else ""
    a = self.accelerator
    return (
      f"{slices}{a.name} ({self.chips} chips, topology {a.topology}, {self.hosts} hosts), "
      f"{a.hbm_bytes / 2**30:.2f} GiB HBM per chip"
    )


@dataclasses.dataclass(frozen=True)
class Batches:
  """Global batches of the inference steps, as given; None: the default noted."""

  segment: int | None = None  # config.eval.batch_size per host, as evaluation reads it.
  generate: int | None = None  # One prompt per chip.
  vae: int | None = None  # Eight images per chip.


def slices(config: ml_collections.ConfigDict, target: Target) -> int:
  """The target's slices, which `config.mesh.slices` must allow."""
  try:
    return sharding.resolve_slices(config.mesh, target.num_slices, target.hosts)
  except ValueError as e:
    raise config_check.ConfigError(f"config: {e} (--num_slices={target.num_slices})") from e


def validate(config: ml_collections.ConfigDict, target: Target) -> None:
  """The config's own checks, and its training batches against the target's chips."""
  config_check.validate(config, "model")
  num_slices = slices(config, target)
  for task in ("segmentation", "generation"):
    if task == "segmentation" or config.data[task].sources:
      config_check.check_batch(
        config,
        f"data.{task}.global_batch_size",
        config.data[task].global_batch_size,
        config.get("microbatches", 1),
        target.chips,
        num_slices,
      )


def inference_batches(
  config: ml_collections.ConfigDict, target: Target, given: Batches, names: Sequence[str]
) -> dict:
  """The global batch of each named inference step, checked against the target's chips."""
  batches = {
    "segment": (
      given.segment or config.eval.batch_size * target.hosts,
      f"eval.batch_size ({config.eval.batch_size} per host x {target.hosts} hosts)"
      if given.segment is None
      else "--segment_batch",
    ),
    "generate": (given.generate or target.chips, "--generate_batch"),
    "vae": (given.vae or 8 * target.chips, "--vae_batch"),
  }
  batches = {name: value for name, value in batches.items() if name in names}
  for batch, field in batches.values():
    config_check.check_batch(config, field, batch, 1, target.chips, slices(config, target))
  return {name: batch for name, (batch, _) in batches.items()}


def build_steps(
  config: ml_collections.ConfigDict, mesh, rules, names: Sequence[str], batches: dict[str, int]
) -> list[steps.Step]:
  builders = {
    "train": lambda: [steps.train_step(config, mesh, rules)],
    "segment": lambda: [steps.segment_step(config, mesh, rules, batches["segment"])],
    "generate": lambda: [steps.generate_step(config, mesh, rules, batches["generate"])],
    "vae": lambda: steps.vae_steps(config, mesh, rules, batches["vae"]),
  }
  unknown = set(names) - set(builders)
  if unknown:
    raise ValueError(f"steps {sorted(unknown)} unknown; choose from {STEPS}")
  return [step for name in names for step in builders[name]()]


def target_mesh(config: ml_collections.ConfigDict, target: Target) -> jax.sharding.Mesh:
  devices = targets.tpu_devices(target.accelerator, target.num_slices)
  return sharding.make_mesh(config.mesh, devices)


def kernel(config: ml_collections.ConfigDict, target: Target) -> str:
  """The attention kernel the config's DiT compiles with for the target."""
  return steps.kernel(config, target_mesh(config, target))


def compile_for(
  config: ml_collections.ConfigDict,
  target: Target,
  names: Sequence[str] = STEPS,
  batches: Batches = Batches(),
) -> list[StepReport]:
  """Compiles the named steps of `config` for `target`; one report per compiled program."""
  validate(config, target)
  sizes = inference_batches(config, target, batches, names)
  mesh = target_mesh(config, target)
  rules = sharding.rules(config.get("sharding"))
  hbm = target.accelerator.hbm_bytes
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    built = build_steps(config, mesh, rules, names, sizes)
    return [compile_step(step, target.chips, hbm) for step in built]


def mesh_of(config: ml_collections.ConfigDict, target: Target) -> dict[str, int]:
  """The mesh `config.mesh` resolves to on the target (data across all slices)."""
  return sharding.global_shape(config.mesh, target.chips, slices(config, target))
