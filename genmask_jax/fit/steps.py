"""Every step a run executes, as a jitted function and abstract inputs on a mesh, ready to compile.

The functions are the ones training, evaluation, precompute and inference call; the inputs are
ShapeDtypeStructs carrying the shardings those callers give them, so that compiling for a mesh
of compile-only devices shows what the real run will allocate. Each step's inputs come in named
groups ("state", "vae", "batch") for the per-chip memory report, with its analytic FLOPs.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from genmask_jax.data import tasks
from genmask_jax.data.preprocess import TEXT_DTYPES
from genmask_jax.models import attention, flops
from genmask_jax.models.genmask import Models
from genmask_jax.models.vae import spatial_stride
from genmask_jax.runs import model as run_model
from genmask_jax.runtime import sharding
from genmask_jax.training import train
from genmask_jax.training.optimizer import make_optimizer


@dataclasses.dataclass(frozen=True)
class Step:
  name: str
  fn: Callable  # jitted
  inputs: dict[str, tuple]  # Named groups of abstract positional arguments, in call order.
  flops: int  # Analytic model FLOPs of one call, over all chips.
  recompute_flops: int = 0  # What rematerialization adds (train step).

  def lower(self) -> jax.stages.Lowered:
    return self.fn.lower(*itertools.chain(*self.inputs.values()))


def _batch_arrays(mesh, shapes: dict[str, tuple[tuple[int, ...], Any]]) -> dict:
  return {
    name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
    for name, (shape, dtype) in shapes.items()
  }


def _text(config: ml_collections.ConfigDict, batch: int) -> dict:
  shape = (batch, config.data.text_len, config.dit.text_dim)
  return {"text": (shape, TEXT_DTYPES[config.data.text_dtype]), "text_mask": (shape[:2], bool)}


def stores_latents(config: ml_collections.ConfigDict, task: str) -> bool:
  """Whether the task's sources read stored latents instead of images (they all do or none)."""
  return any(s.get("latents") for s in config.data[task].sources)


def train_batch(config: ml_collections.ConfigDict, mesh, batch: dict[str, int]) -> dict:
  """The train step's batch as `train.device_batch` makes it: `batch[task]` samples per task."""
  out = {}
  for task, size in batch.items():
    resolution = config.data[task].resolution
    side = resolution // spatial_stride(config.vae.dim_mult)
    shapes = _text(config, size)
    if stores_latents(config, task):
      for key in train.STORED_LATENT_KEYS[task]:
        shapes[key] = ((size, side, side, config.vae.z_dim), jnp.float32)
    else:
      shapes["image"] = ((size, resolution, resolution, 3), jnp.float32)
    if task == tasks.NAMES[tasks.SEGMENTATION]:
      shapes["mask"] = ((size, resolution, resolution), jnp.uint8)
    out[task] = _batch_arrays(mesh, shapes)
  return out


def abstract_key(mesh) -> jax.ShapeDtypeStruct:
  key = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))


def _params(models: Models, mesh, rules) -> tuple[Any, Any]:
  """(trainable parameters, frozen VAE parameters), abstract and sharded."""
  params, _ = sharding.abstract_with_shardings(models.abstract_params(), mesh, rules)
  vae, _ = sharding.abstract_with_shardings(models.abstract_vae_params(), mesh, rules)
  return params, vae


def kernel(config: ml_collections.ConfigDict, mesh) -> str:
  """The attention kernel the DiT compiles with on `mesh`'s devices."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return attention.resolve(config.dit.attention, jnp.dtype(config.dit.dtype))


def train_step(config: ml_collections.ConfigDict, mesh, rules) -> Step:
  """The train step at the config's global batch (segmentation, and generation if it has
  sources), its VAE encoding in the step unless the sources store latents."""
  models, optimizer = Models.from_config(config), make_optimizer(config.optimizer)
  state, shardings = train.abstract_train_state(models, config, optimizer, mesh, rules)
  _, vae = _params(models, mesh, rules)
  sizes = {task: config.data[task].global_batch_size for task in tasks.NAMES}
  if not config.data.generation.sources:
    del sizes["generation"]
  resolution = config.data.segmentation.resolution
  segmentation, generation = sizes["segmentation"], sizes.get("generation", 0)
  encodes = not stores_latents(config, "segmentation")
  return Step(
    "train",
    train.compile_train_step(models, config, optimizer, shardings, mesh),
    {
      "state": (state,),
      "vae": (vae,),
      "batch": (train_batch(config, mesh, sizes),),
      "rng": (abstract_key(mesh),),
    },
    flops.train_step_flops(config, segmentation, generation, resolution, encodes),
    flops.train_step_recompute_flops(
      config, segmentation, generation, resolution, kernel(config, mesh)
    ),
  )


def segment_step(config: ml_collections.ConfigDict, mesh, rules, batch: int) -> Step:
  """One-step segmentation of `batch` images (evaluation and predict): encode, DiT, decode."""
  models = Models.from_config(config)
  params, vae = _params(models, mesh, rules)
  resolution = config.data.segmentation.resolution
  shapes = {"image": ((batch, resolution, resolution, 3), jnp.float32), **_text(config, batch)}
  n = flops.noisy_tokens(config, resolution)
  tokens = 2 * n if config.diffusion.use_condition_tokens else n
  per_image = (
    config.segment.get("steps", 1)
    * flops.dit_forward_flops(config.dit, tokens, n, config.data.text_len)
    + flops.vae_encode_flops(config.vae, resolution)
    + flops.vae_decode_flops(config.vae, resolution)
  )
  return Step(
    "segment",
    run_model.segmenter(models, config),
    {"state": (params,), "vae": (vae,), "batch": tuple(_batch_arrays(mesh, shapes).values())},
    batch * per_image,
  )


def generate_step(config: ml_collections.ConfigDict, mesh, rules, batch: int) -> Step:
  """Text-to-image sampling of `batch` prompts: `config.generate.num_steps` guided DiT steps
  (conditional and unconditional halves in one forward), then the VAE decode."""
  models = Models.from_config(config)
  params, vae = _params(models, mesh, rules)
  resolution = config.data.generation.resolution
  n = flops.noisy_tokens(config, resolution)
  dit = flops.dit_forward_flops(config.dit, n, n, config.data.text_len)
  guided = 2 if config.generate.guidance_scale != 1 else 1
  per_prompt = config.generate.num_steps * guided * dit
  side = resolution // spatial_stride(config.vae.dim_mult)
  noise = {"noise": ((batch, 1, side, side, config.vae.z_dim), jnp.float32)}
  scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
  return Step(
    "generate",
    run_model.generator(models, config),
    {
      "state": (params,),
      "vae": (vae,),
      "batch": tuple(_batch_arrays(mesh, noise | _text(config, batch)).values()),
      "guidance": (scale,),
    },
    batch * (per_prompt + flops.vae_decode_flops(config.vae, resolution)),
  )


def vae_steps(config: ml_collections.ConfigDict, mesh, rules, batch: int) -> list[Step]:
  """The frozen VAE's encode (latent precompute, segmentation's condition) and decode (masks and
  generated images) of `batch` images at the segmentation resolution."""
  models = Models.from_config(config)
  _, vae = _params(models, mesh, rules)
  resolution = config.data.segmentation.resolution
  side = resolution // spatial_stride(config.vae.dim_mult)
  images = _batch_arrays(mesh, {"images": ((batch, resolution, resolution, 3), jnp.float32)})
  latents = _batch_arrays(mesh, {"latents": ((batch, side, side, config.vae.z_dim), jnp.float32)})
  return [
    Step(
      "vae_encode",
      jax.jit(models.encode),
      {"vae": (vae,), "batch": (images["images"],)},
      batch * flops.vae_encode_flops(config.vae, resolution),
    ),
    Step(
      "vae_decode",
      jax.jit(models.decode),
      {"vae": (vae,), "batch": (latents["latents"],)},
      batch * flops.vae_decode_flops(config.vae, resolution),
    ),
  ]


def per_chip_bytes(tree: Any) -> int:
  """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (the most loaded chip)."""
  total = 0
  for x in jax.tree.leaves(tree):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      continue  # A key is a few bytes.
    total += int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
  return total
