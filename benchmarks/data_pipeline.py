"""Throughput of the training input pipeline (samples per second, both tasks counted).

  python -m benchmarks.data_pipeline --resolution=512 --workers 0 2 [--latents] [--gcs]

Writes COCO-like sample stores (640x480 JPEGs of smooth noise with masks, and captioned
images for generation) and feature stores with Qwen2.5-VL-7B-sized hidden states (with
--latents also latent stores, which replace image decoding), then times
`pipeline.train_dataset` after a warm-up, once per worker count. --gcs also serves the same
stores from a GCS API server on 127.0.0.1 (genmask_jax.runtime.gcs_emulator) and times local and gs://
reading in alternating rounds: the ratio shows the cost of the object-store code path
(requests, ranged reads), not a real bucket's latency.
"""

from __future__ import annotations

import os
import tempfile
import time

import cv2
import grain
import numpy as np
from absl import app, flags

from configs import data
from genmask_jax.data import encode_latents, pipeline, records, tasks
from genmask_jax.data.features import FeatureItem, FeatureMeta, FeatureWriter, StoreLayout
from genmask_jax.runtime import fileio, gcs_emulator
from genmask_jax.vlm import image_policy
from genmask_jax.vlm.prompts import prompt_template


def _photo(rng: np.random.Generator, height: int, width: int) -> bytes:
  """A JPEG of smooth noise, about as costly to decode as a natural photo of its size."""
  coarse = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
  image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
  image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
  return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def make_stores(root: str, task: str, args) -> dict:
  """A task's sample and feature stores (and latent store with args.latents) under `root`."""
  rng = np.random.default_rng(tasks.NAMES.index(task))
  samples = os.path.join(root, task)
  with records.RecordWriter(samples, 256) as writer:
    for i in range(args.num_samples):
      h, w = (480, 640) if i % 2 else (640, 480)
      mask = None
      if task == "segmentation":
        mask = np.zeros((h, w), np.uint8)
        cv2.ellipse(mask, (w // 2, h // 2), (w // 4, h // 5), 0, 0, 360, 1, -1)
      image = _photo(rng, h, w)
      writer.write(
        records.make_sample(
          sample_id=f"{task}/{i}", task=task, image=image, mask=mask, text="x", source={}
        )
      )
  features = os.path.join(root, task + "_features")
  meta = FeatureMeta(
    args.model_id, prompt_template(), "bfloat16", args.hidden, image_policy.DEFAULT.to_record()
  )
  feature_writer = FeatureWriter(features, meta, StoreLayout(args.num_samples, 1, 64), 0)
  for shard, start, stop in feature_writer.pending_shards():
    feature_writer.write_shard(
      shard,
      [
        FeatureItem(f"{task}/{i}", "x", rng.normal(size=(args.tokens, args.hidden)))
        for i in range(start, stop)
      ],
    )
  assert feature_writer.finalize()
  source = {"records": samples, "features": features}
  if args.latents:  # Random latents of the right shape: only their reading is timed.
    side = args.resolution // 8
    source["latents"] = os.path.join(root, task + "_latents")
    encode_latents.encode_store(
      lambda x: rng.normal(size=(len(x), side, side, 16)).astype(np.float32),
      samples,
      source["latents"],
      vae="bench",
      resolution=args.resolution,
    )
  return source


def _rate(cfg, args) -> float:
  """Samples per second over `args.steps` steps after 2 warm-up steps."""
  batches = iter(pipeline.train_dataset(cfg, grain.sharding.NoSharding()))
  for _ in range(2):
    next(batches)
  start = time.perf_counter()
  for _ in range(args.steps):
    next(batches)
  seconds = time.perf_counter() - start
  batches.close()
  return args.steps * 2 * args.batch_size / seconds


def _moved(cfg, old_root: str, new_root: str):
  """`cfg` with every store path under `new_root` instead of `old_root`."""
  cfg = cfg.copy_and_resolve_references()
  for task in tasks.NAMES:
    cfg[task].sources = [
      {k: v.replace(old_root, new_root, 1) for k, v in s.items()} for s in cfg[task].sources
    ]
  return cfg


flags.DEFINE_integer("resolution", 512, "Image side in pixels.")
flags.DEFINE_integer("batch_size", 8, "Per task and step.")
flags.DEFINE_list("workers", ["0", "2"], "grain worker counts to time, comma-separated.")
flags.DEFINE_integer("num_samples", 96, "Per task.")
flags.DEFINE_integer("steps", 12, "Timed steps after 2 warm-up ones.")
flags.DEFINE_integer("hidden", 3584, "Qwen2.5-VL-7B's width.")
flags.DEFINE_integer("tokens", 350, "Real tokens per sample.")
flags.DEFINE_integer("text_len", 512, "Text length in tokens (padded).")
flags.DEFINE_enum("text_dtype", "bfloat16", list(pipeline.TEXT_DTYPES), "Host dtype of the text.")
flags.DEFINE_integer("threads", 8, "grain reader threads.")
flags.DEFINE_string("model_id", "bench", "Encoder id the stores record.")
flags.DEFINE_bool("latents", False, "Read latent stores too.")
flags.DEFINE_bool("gcs", False, "Also read the stores from gs://.")
flags.DEFINE_integer("rounds", 2, "Alternating rounds with --gcs.")


def main(argv: list[str]) -> None:
  del argv
  args = flags.FLAGS
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags.

  with tempfile.TemporaryDirectory() as root:
    cfg = data.default_config()
    cfg.update(
      encoder_model_id=args.model_id,
      text_len=args.text_len,
      text_dtype=args.text_dtype,
      num_threads=args.threads,
    )
    for task in tasks.NAMES:
      cfg[task].update(
        sources=[make_stores(root, task, args)],
        resolution=args.resolution,
        global_batch_size=args.batch_size,
      )
    configs = {"local": cfg}
    if args.gcs:
      gcs = gcs_emulator.Emulator().start().stop_at_exit()
      gcs_emulator.apply(gcs.env)  # Inherited by grain's worker processes.
      bucket = gcs.create_bucket("benchmark")
      fileio.upload_tree(root, f"{bucket}/stores")
      configs["gs://"] = _moved(cfg, root, f"{bucket}/stores")
    print(
      f"{os.cpu_count()} CPUs; {args.resolution}x{args.resolution}, batch {args.batch_size} per "
      f"task, 640x480 JPEGs, text {args.tokens}/{args.text_len} x {args.hidden} {args.text_dtype}"
      + (", stored latents" if args.latents else "")
    )
    for workers in map(int, args.workers):
      rates = {name: [] for name in configs}
      for _ in range(args.rounds if args.gcs else 1):
        for name, config in configs.items():
          config.num_workers = workers
          rates[name].append(_rate(config, args))
      line = ", ".join(f"{n} {np.mean(r):.1f} samples/s" for n, r in rates.items())
      if args.gcs:
        line += f" (gs:// / local = {np.mean(rates['gs://']) / np.mean(rates['local']):.2f})"
      print(f"workers {workers}: {line}")


if __name__ == "__main__":
  app.run(main)
