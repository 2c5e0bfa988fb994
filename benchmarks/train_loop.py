r"""The real training loop against the bare jitted step on the same kind of batches.

  python -m benchmarks.train_loop [--resolution=512] [--steps=30] [--batch_size=4]

Writes sample and feature stores of 640x480 JPEGs (benchmarks/data_pipeline.py), trains the
tiny config's model on them at --resolution with `genmask_jax.training.train.train` (grain pipeline,
metrics, the final checkpoint) and times its steady state from the metric writer's steps/s
(log steps after the first, so compilation is excluded); then times the bare compiled step on 4
batches of the same pipeline already on the device (benchmarks/demo_step.py), before and after
the loop. Prints both and
loop time / step time: what the host side (data, metrics, checkpoint decisions) adds to a step.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import types

import numpy as np
from absl import app, flags

from benchmarks.data_pipeline import make_stores
from benchmarks.demo_step import step_runner
from configs.genmask import get_config
from genmask_jax.data import tasks
from genmask_jax.runtime import fileio, log_filter
from genmask_jax.training import train


def loop_seconds_per_step(config, workdir: str) -> float:
  train.train(config, workdir)
  rows = [json.loads(line) for line in fileio.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  rates = [r["steps_per_s"] for r in rows if "steps_per_s" in r]
  return 1 / float(np.mean(rates))


flags.DEFINE_integer("resolution", 512, "Image side in pixels.")
flags.DEFINE_integer("batch_size", 4, "Per task and step.")
flags.DEFINE_integer("steps", 30, "Timed train steps.")
flags.DEFINE_integer("log_every", 5, "config.log_every of the loop.")
flags.DEFINE_integer("num_samples", 32, "Per task.")


def main(argv: list[str]) -> None:
  del argv
  args = flags.FLAGS
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags.
  log_filter.quiet_library_logs()

  config = get_config("tiny")
  store_args = types.SimpleNamespace(
    num_samples=args.num_samples, model_id="bench", hidden=config.dit.text_dim, tokens=8,
    latents=False, resolution=args.resolution,
  )  # fmt: skip
  with tempfile.TemporaryDirectory() as root:
    config.data.update(encoder_model_id="bench", text_len=16, num_threads=4)
    for task in tasks.NAMES:
      config.data[task].update(
        sources=[make_stores(root, task, store_args)],
        resolution=args.resolution,
        global_batch_size=args.batch_size,
      )
    config.update(total_steps=args.steps, log_every=args.log_every)
    config.checkpoint.every = args.steps
    config.mesh = dict(data=1, fsdp=-1, tensor=1)
    run_step = step_runner(config)
    run_step(2)  # Warm-up.

    def bare_seconds_per_step() -> float:
      start = time.perf_counter()
      run_step(args.steps)
      return (time.perf_counter() - start) / args.steps

    # The bare step before and after the loop: a machine whose speed drifts affects both alike.
    before = bare_seconds_per_step()
    loop = loop_seconds_per_step(config, os.path.join(root, "run"))
    step = (before + bare_seconds_per_step()) / 2
  print(
    f"tiny model, {args.resolution}x{args.resolution}, batch {args.batch_size} per task: "
    f"bare step {step * 1e3:.1f} ms, train() loop {loop * 1e3:.1f} ms/step, "
    f"loop / step {loop / step:.3f}"
  )


if __name__ == "__main__":
  app.run(main)
