"""Small training stores for the trainer's tests: synthetic samples plus seeded random features."""

from __future__ import annotations

import os

import numpy as np

from genmask_jax.data import records, synthetic
from genmask_jax.data.features import FeatureItem, FeatureMeta, FeatureWriter, StoreLayout
from genmask_jax.data.store import is_complete
from genmask_jax.vlm import image_policy
from genmask_jax.vlm.prompts import prompt_template

POLICY = image_policy.DEFAULT.to_record()  # Every feature store records one.

ENCODER = "test-encoder"
HIDDEN = 32  # The tiny DiT's text_dim.
TEXT_LEN = 8
IMAGE_SIZE = 32


def _features(path: str, store: str, seed: int) -> None:
  ids = records.RecordReader(store).ids()
  meta = FeatureMeta(ENCODER, prompt_template(), "float16", HIDDEN, POLICY)
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
    if not is_complete(features):
      with records.RecordWriter(store, 16, overwrite=True) as writer:
        for sample in synthetic.samples(split, num_samples, seed=seed, image_size=IMAGE_SIZE):
          writer.write(sample)
      _features(features, store, seed)
    paths[task] = {"records": store, "features": features}
  return paths

  def get_state(self) -> bytes:
    return str(self.step).encode()

  def set_state(self, state: bytes) -> None:
    self.step = int(state.decode())

  def start_prefetch(self) -> None:
    pass
