"""GenMask training: one jitted, sharded step over a segmentation and a generation sub-batch.

Read top to bottom: the train state and its shardings, the step, the loop. The frozen VAE
encodes images and masks inside the step, unless the data carry their latents from a latent
store (data/latents.py); the DiT (and, for the linear-BCE format, a linear mask head) are the
only trained parameters.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct

from genmask_jax.conversion import weights
from genmask_jax.data import latents, tasks
from genmask_jax.data.masks import mask_to_image
from genmask_jax.diffusion import losses
from genmask_jax.evaluation import evaluate
from genmask_jax.models.genmask import Models
from genmask_jax.runs import checkpoints, model, record
from genmask_jax.runtime import compile_cache, distributed, sharding
from genmask_jax.training import preemption
from genmask_jax.training.metric_writer import MetricWriter
from genmask_jax.training.optimizer import ema_update, learning_rate, make_optimizer

# What the step reads of a data sub-batch (the rest stays on the host); latents from a latent
# store replace the image.
SEGMENTATION_KEYS = ("image", "mask", "text", "text_mask")
GENERATION_KEYS = ("image", "text", "text_mask")
STORED_LATENT_KEYS = {
  "segmentation": ("image_latents", "mask_latents"),
  "generation": ("image_latents",),
}


class NonFiniteError(FloatingPointError):
  """The loss or the gradient norm stopped being finite."""


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any  # {"dit": ..., "mask_head": ...} (the head only for linear_bce).
  opt_state: Any
  ema_params: Any = None  # Their moving average, with config.optimizer.ema_decay > 0.


def new_train_state(params: Any, optimizer, config: ml_collections.ConfigDict) -> TrainState:
  ema = params if config.optimizer.get("ema_decay", 0.0) else None
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), ema)


def eval_params(state: TrainState) -> Any:
  """The parameters evaluation and inference use: the moving average when there is one."""
  return state.params if state.ema_params is None else state.ema_params


def abstract_train_state(models, config, optimizer, mesh, rules) -> tuple[TrainState, TrainState]:
  """The train state's shapes and shardings, derived without materializing anything."""

  init = lambda: new_train_state(models.init_params(jax.random.key(0)), optimizer, config)
  return sharding.abstract_with_shardings(jax.eval_shape(init), mesh, rules)


def initial_train_state(models, config, optimizer, mesh, rules) -> TrainState:
  """A fresh train state, each array created directly in its sharding.

  With `config.init.weights` (a folder from launch/convert_wan.py) the DiT starts from those
  weights, restored straight into their shardings; otherwise from a random initialization.
  """
  abstract, shardings = abstract_train_state(models, config, optimizer, mesh, rules)
  rng = jax.random.key(config.seed)

  @functools.partial(jax.jit, out_shardings=shardings)
  def create(rng, dit_params):
    params = sharding.strip_axis_names(models.init_params(rng))
    if dit_params is not None:
      params["dit"] = dit_params
    return new_train_state(params, optimizer, config)

  dit_params = None
  if config.init.weights:
    dit_params = weights.restore(config.init.weights, "dit", abstract.params["dit"])
  return create(rng, dit_params)


def encode_batch(models: Models, vae_params, sub_batch: dict, task: int) -> dict:
  """A data sub-batch as the loss sees it: clean latents, text, condition latents."""

  def clean_latents(name: str) -> jax.Array:  # Of "image" or "mask": stored, or encoded here.
    if f"{name}_latents" in sub_batch:
      return sub_batch[f"{name}_latents"][:, None]
    pixels = sub_batch[name]
    return models.encode(vae_params, mask_to_image(pixels) if name == "mask" else pixels)

  out = {"context": sub_batch["text"], "context_mask": sub_batch["text_mask"]}
  if task == tasks.SEGMENTATION:
    out["latents"] = clean_latents("mask")
    out["mask"] = sub_batch["mask"]
    if models.use_condition_tokens:
      out["cond"] = clean_latents("image")
  else:
    out["latents"] = clean_latents("image")
  return out


def batch_gradients(
  models: Models, config: ml_collections.ConfigDict, params: Any, vae_params: Any, batch: dict, rng
) -> tuple[Any, dict[str, jax.Array]]:
  """(gradients, metrics) of the loss over a segmentation and (optionally) a generation
  sub-batch: the mean per-sample loss over both."""
  loss_fn = functools.partial(
    losses.training_loss,
    models.velocity,
    config=config.diffusion,
    vae_params=vae_params,
    vae_mask_logits=models.vae_mask_logits,
  )
  parts = [(tasks.SEGMENTATION, batch["segmentation"])]
  if "generation" in batch:
    parts.append((tasks.GENERATION, batch["generation"]))
  encoded = [(encode_batch(models, vae_params, b, task), task) for task, b in parts]

  def total_loss(params):
    total, count, metrics = 0.0, 0, {}
    for sub_batch, task in encoded:
      n = sub_batch["latents"].shape[0]
      loss = loss_fn(params, sub_batch, jax.random.fold_in(rng, task), task=task)
      total, count = total + loss * n, count + n
      metrics[f"loss/{tasks.NAMES[task]}"] = loss
    return total / count, metrics

  (loss, metrics), grads = jax.value_and_grad(total_loss, has_aux=True)(params)
  return grads, dict(metrics, loss=loss)


def split_microbatches(batch: dict, count: int) -> dict:
  """Each array (B, ...) of `batch` as (count, B / count, ...): microbatch i holds rows i,
  i + count, ... so that every device keeps its own rows (no data moves)."""

  def split(x):
    micro = x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(micro, (None, "activation_batch") + (None,) * (x.ndim - 1))

  return jax.tree.map(split, batch)


def accumulated_gradients(
  models: Models, config: ml_collections.ConfigDict, params: Any, vae_params: Any, batch: dict, rng
) -> tuple[Any, dict[str, jax.Array]]:
  """`batch_gradients` of the whole batch, taken in `config.microbatches` parts one after the
  other (gradient accumulation: the activation memory of one part); part i draws its noise from
  `rng` folded with i. Metrics and gradients are the parts' means."""
  count = config.get("microbatches", 1)
  gradients = functools.partial(batch_gradients, models, config, params, vae_params)
  if count == 1:
    return gradients(batch, rng)
  micro = split_microbatches(batch, count)
  shapes = jax.eval_shape(gradients, jax.tree.map(lambda x: x[0], micro), rng)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

  def accumulate(sums, part):
    i, micro_batch = part
    return jax.tree.map(jnp.add, sums, gradients(micro_batch, jax.random.fold_in(rng, i))), None

  sums, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(count), micro))
  return jax.tree.map(lambda x: x / count, sums)


def train_step(
  models: Models,
  config: ml_collections.ConfigDict,
  optimizer: optax.GradientTransformation,
  state: TrainState,
  vae_params: Any,
  batch: dict[str, dict[str, jax.Array]],
  rng: jax.Array,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update from a segmentation and (optionally) a generation sub-batch."""
  rng = jax.random.fold_in(rng, state.step)
  grads, metrics = accumulated_gradients(models, config, state.params, vae_params, batch, rng)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    ema = ema_update(ema, params, config.optimizer.ema_decay, state.step)
  state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
  metrics.update(grad_norm=optax.global_norm(grads))
  return state, metrics


def compile_train_step(models, config, optimizer, state_shardings, mesh):
  """`train_step` jitted with explicit shardings; the state is donated."""
  step = functools.partial(train_step, models, config, optimizer)
  return jax.jit(
    step,
    in_shardings=(state_shardings, None, None, sharding.replicated(mesh)),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )


def device_batch(host_batch: dict[str, dict[str, np.ndarray]], mesh) -> dict:
  """The step's inputs as global arrays, from this process's share of the batch."""
  keys = {"segmentation": SEGMENTATION_KEYS, "generation": GENERATION_KEYS}
  batch = {}
  for task, part in host_batch.items():
    names = list(keys[task])
    if STORED_LATENT_KEYS[task][0] in part:  # Such examples hold no image.
      names = [k for k in names if k != "image"] + list(STORED_LATENT_KEYS[task])
    batch[task] = sharding.global_batch({k: part[k] for k in names}, mesh)
  return batch


def check_latent_stores(config: ml_collections.ConfigDict, vae_fingerprint: str) -> None:
  """Refuses latent stores that another VAE (or VAE config) than this run's encoded."""
  for _, source in latents.latent_sources(config.data):
    latents.check_vae(source["latents"], vae_fingerprint)


def check_finite(step: int, metrics: dict[str, float]) -> None:
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    raise NonFiniteError(
      f"step {step}: non-finite {bad}; stopping (the last checkpoint, saved before this step, "
      "is intact)"
    )


def publish_metrics(pending: list, writer: MetricWriter, schedule) -> None:
  """Fetches the metrics of the steps in `pending` (step, device metrics) and writes them in
  order; NonFiniteError at the first non-finite step. Empties `pending`."""
  for step, metrics in jax.device_get(pending):
    metrics = {k: float(v) for k, v in metrics.items()}
    check_finite(step, metrics)
    writer.write(step, dict(metrics, lr=float(schedule(step - 1))))
  pending.clear()


def train(
  config: ml_collections.ConfigDict, workdir: str, batches: Iterator[dict] | None = None
) -> TrainState:
  """Trains (or resumes) under `workdir` until `config.total_steps`; returns the final state.

  `batches` defaults to the grain pipeline of `config.data`; it must support grain's
  get_state/set_state so that a resumed run sees the same data.
  """
  from genmask_jax.data import pipeline

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.get("sharding"))
  models = Models.from_config(config)
  optimizer = make_optimizer(config.optimizer)
  schedule = learning_rate(config.optimizer)
  if batches is None:
    batches = iter(pipeline.train_dataset(config.data))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract, shardings = abstract_train_state(models, config, optimizer, mesh, rules)
    ckpt = checkpoints.TrainCheckpoints(
      os.path.join(workdir, "checkpoints"),
      keep=config.checkpoint.keep,
      every=config.checkpoint.every,
      async_save=config.checkpoint.async_save,
    )
    latest = ckpt.latest_step()
    # A resume trains the model the run holds: other model fields are refused by name here,
    # before Orbax fails on the parameters' layout (or, for the VAE, silently does not).
    recorded = record.read_record(workdir) if latest is not None else None
    if recorded is not None:
      record.check_config(recorded, config, workdir)
    if latest is None:
      source = config.init.weights or f"a random initialization (seed {config.seed})"
      logging.info("starting at step 0; DiT weights from %s", source)
      state = initial_train_state(models, config, optimizer, mesh, rules)
    else:
      logging.info("resuming from step %d", latest)
      state = ckpt.restore(latest, abstract, batches)
    frozen_vae = model.frozen_vae_params(models, config, mesh, rules)
    fingerprint = model.vae_fingerprint(models.vae, frozen_vae)
    vae = model.describe_vae(model.vae_identity(config, fingerprint))
    logging.info("frozen VAE: %s (fingerprint %s)", vae, fingerprint[:12])
    if recorded is not None:
      record.check_vae(recorded, config, fingerprint, workdir)
    check_latent_stores(config, fingerprint)
    # What evaluation and inference need to rebuild this model (genmask_jax/runs/record.py).
    if jax.process_index() == 0:
      record.write_record(workdir, record.training_record(config, fingerprint))
    step_fn = compile_train_step(models, config, optimizer, shardings, mesh)
    rng = jax.random.key(config.seed + 2)
    num_tasks = 1 + bool(config.data.generation.sources)
    samples_per_step = num_tasks * config.data.segmentation.global_batch_size
    logging.info(
      "global batch: %d samples per step (%d per task, %d processes)",
      samples_per_step,
      config.data.segmentation.global_batch_size,
      jax.process_count(),
    )
    writer = MetricWriter(workdir, config.total_steps, samples_per_step, config.log_every)
    first_step = int(state.step) + 1
    # The host never waits for a step: metrics stay on the device until a log, evaluation or
    # checkpoint step, and the next batch is read and transferred while the step runs.
    pending = []
    batch = device_batch(next(batches), mesh) if first_step <= config.total_steps else None
    try:
      for step in range(first_step, config.total_steps + 1):
        if step == first_step:  # Compile first, then all processes start stepping together.
          start, hits = time.perf_counter(), compile_cache.counts()["hits"]
          step_fn = step_fn.lower(state, frozen_vae, batch, rng).compile()
          how = (
            "loaded from the compilation cache"
            if compile_cache.counts()["hits"] > hits
            else "compiled"
          )
          logging.info("train step %s in %.1f s", how, time.perf_counter() - start)
          distributed.wait_for_peers("train_step_compiled")
          preemption.start_stepping()  # A notice is now taken at a step: it saves that step.
        state, metrics = step_fn(state, frozen_vae, batch, rng)
        pending.append((step, metrics))
        preempted = preemption.reached(step)
        save = step == config.total_steps or preempted or ckpt.is_save_step(step)
        evaluate_now = config.eval.every_steps and step % config.eval.every_steps == 0
        if save or evaluate_now or step % config.log_every == 0:
          publish_metrics(pending, writer, schedule)  # Raises before a non-finite state is saved.
        if save:
          ckpt.save(step, state, batches, config, force=True)
          writer.flush()  # Every step up to a checkpoint is published before it can resume.
        if preempted:  # `finally` waits for this step's checkpoint; the process then exits 0.
          break
        if step < config.total_steps:  # After the save: the saved data state is this step's.
          batch = device_batch(next(batches), mesh)
        if evaluate_now:
          out_dir = os.path.join(workdir, "eval", f"step_{step}")
          results = evaluate.evaluate_params(
            models, eval_params(state), frozen_vae, config, mesh, out_dir
          )
          writer.write_eval(step, results)
    finally:
      ckpt.wait()
      ckpt.close()
      writer.close()
  return state
