"""Small training stores for the trainer's tests: synthetic samples plus seeded random features."""

from __future__ import annotations

import os

import numpy as np

from genmask_jax.data import records, synthetic
from genmask_jax.data.features import FeatureItem, FeatureMeta, FeatureWriter, StoreLayout
from genmask_jax.runtime import fileio
from genmask_jax.vlm.prompts import prompt_template

ENCODER = "test-encoder"
HIDDEN = 32  # The tiny DiT's text_dim.
TEXT_LEN = 8
IMAGE_SIZE = 32


def _features(path: str, store: str, seed: int) -> None:
  ids = records.RecordReader(store).ids()
  meta = FeatureMeta(ENCODER, prompt_template(), "float16", HIDDEN)
  writer = FeatureWriter(path, meta, StoreLayout(len(ids), 1, 16), 0)
  rng = np.random.default_rng(seed)
  for shard, start, stop in writer.pending_shards():
    items = [
      FeatureItem(ids[i], f"text {i}", rng.standard_normal((3 + i % 6, HIDDEN), np.float32))
      for i in range(start, stop)
    ]
    writer.write_shard(shard, items)
  writer.finalize()


def make_stores(root: str, num_samples: int = 32) -> dict[str, str]:
  """Segmentation and generation sample stores with feature stores under `root` (idempotent)."""
  paths = {}
  for seed, (task, split) in enumerate([("segmentation", "train"), ("generation", "gen")]):
    store, features = os.path.join(root, task), os.path.join(root, f"{task}_features")
    if not fileio.exists(os.path.join(features, "manifest.json")):
      with records.RecordWriter(store, 16, overwrite=True) as writer:
        for sample in synthetic.samples(split, num_samples, seed=seed, image_size=IMAGE_SIZE):
          writer.write(sample)
      _features(features, store, seed)
    paths[task] = {"records": store, "features": features}
  return paths


class SlicedBatches:
  """Seeded global batches of which each process takes its rows: the same global data for any
  number of processes. Checkpointable like a grain iterator (bytes state)."""

  def __init__(self, seed: int, global_batch: int, process_index: int, process_count: int):
    self.seed, self.step = seed, 0
    per_process = global_batch // process_count
    self.rows = slice(process_index * per_process, (process_index + 1) * per_process)
    self.global_batch = global_batch

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rng = np.random.default_rng([self.seed, self.step])
    self.step += 1
    g, r = self.global_batch, IMAGE_SIZE

    def part(with_mask: bool) -> dict:
      lengths = rng.integers(1, TEXT_LEN + 1, g)
      out = {
        "image": rng.uniform(-1, 1, (g, r, r, 3)).astype(np.float32),
        "text": rng.standard_normal((g, TEXT_LEN, HIDDEN)).astype(np.float32),
        "text_mask": np.arange(TEXT_LEN)[None] < lengths[:, None],
      }
      if with_mask:
        out["mask"] = (rng.uniform(size=(g, r, r)) > 0.5).astype(np.uint8)
      return {k: v[self.rows] for k, v in out.items()}

    return {"segmentation": part(True), "generation": part(False)}

  def get_state(self) -> bytes:
    return str(self.step).encode()

  def set_state(self, state: bytes) -> None:
    self.step = int(state.decode())

  def start_prefetch(self) -> None:
    pass
