r"""The demo's train step encoding images in the step against reading stored latents (CPU).

  python -m benchmarks.demo_step --workdir=runs/demo [--rounds=12] [--steps_per_round=5]

Makes (or reuses) the demo's data, features, VAE and latent stores under --workdir, compiles the
demo's train step for both kinds of batch (images and masks, encoded by the frozen VAE in the
step; their stored latents) and times them in alternating rounds, so that a machine whose speed
drifts slows both alike. Prints the median milliseconds per step of each and their ratio, and
the kernel's share: CPU milliseconds in the kernel and minor page faults per step. Run it under
`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` and `=1` to see what huge pages do for XLA's buffers
(runtime/host_memory.py; the demo itself sets `=1`).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import linen as nn

from configs.demo import get_config
from genmask_jax import demo
from genmask_jax.data import pipeline
from genmask_jax.models.genmask import Models
from genmask_jax.runs.model import frozen_vae_params
from genmask_jax.runtime import log_filter, sharding
from genmask_jax.training import train
from genmask_jax.training.optimizer import make_optimizer

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "The demo work directory to reuse.")
_ROUNDS = flags.DEFINE_integer("rounds", 12, "Timed rounds per variant (after one warm-up).")
_STEPS = flags.DEFINE_integer("steps_per_round", 5, "Train steps per round.")


def step_runner(config: ml_collections.ConfigDict) -> Callable[[int], None]:
  """A function running n train steps (cycling over 4 real batches) and waiting for them."""
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config.get("sharding"))
  models, optimizer = Models.from_config(config), make_optimizer(config.optimizer)
  rng = jax.random.key(0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, shardings = train.abstract_train_state(models, config, optimizer, mesh, rules)
    state = train.initial_train_state(models, config, optimizer, mesh, rules)
    vae = frozen_vae_params(models, config, mesh, rules)
    batches = iter(pipeline.train_dataset(config.data))
    batches = [train.device_batch(next(batches), mesh) for _ in range(4)]
    step = train.compile_train_step(models, config, optimizer, shardings, mesh)
    step = step.lower(state, vae, batches[0], rng).compile()

  def run(n: int) -> None:
    nonlocal state
    for i in range(n):
      state, metrics = step(state, vae, batches[i % len(batches)], rng)
    jax.block_until_ready(metrics)

  return run


def main(argv: list[str]) -> None:
  del argv
  log_filter.quiet_library_logs()
  stored = get_config()
  demo.prepare(stored, _WORKDIR.value)
  in_step = stored.copy_and_resolve_references()
  for task in ("segmentation", "generation"):
    in_step.data[task].sources = [
      {k: v for k, v in s.items() if k != "latents"} for s in stored.data[task].sources
    ]
  variants = {
    "VAE encoder in the step": step_runner(in_step),
    "stored latents": step_runner(stored),
  }
  rounds = {name: [] for name in variants}  # (wall seconds, kernel seconds, page faults) a step
  for r in range(_ROUNDS.value + 1):
    for name, run in variants.items():
      before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
      run(_STEPS.value)
      wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
      if r:  # Round 0 warms up.
        kernel, faults = after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt
        rounds[name].append(np.array([wall, kernel, faults]) / _STEPS.value)
  medians = {name: np.median(x, axis=0) for name, x in rounds.items()}
  ms = {name: 1000 * float(m[0]) for name, m in medians.items()}
  print(
    f"\nThe demo's train step, {jax.devices()[0].device_kind}, median of {_ROUNDS.value} rounds, "
    f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"
  )
  for name, (wall, kernel, faults) in medians.items():
    print(
      f"{name:28s} {1000 * wall:7.1f} ms/step, {1000 * kernel:5.1f} ms in the kernel, "
      f"{faults:6.0f} page faults"
    )
  base, new = ms.values()
  print(f"{'stored / in the step':28s} {new / base:7.2f}")


if __name__ == "__main__":
  app.run(main)
