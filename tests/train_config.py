"""The trainer tests' config: tiny models on `training_data` stores. Arg: the stores' root."""

from __future__ import annotations

import ml_collections
from training_data import ENCODER, IMAGE_SIZE, TEXT_LEN, make_stores

from configs.genmask import get_config as genmask_config


def get_config(root: str) -> ml_collections.ConfigDict:
  config = genmask_config("tiny")
  stores = make_stores(root)
  data = config.data
  data.encoder_model_id, data.text_len, data.num_threads = ENCODER, TEXT_LEN, 2
  for task in ("segmentation", "generation"):
    data[task].sources = [stores[task]]
    data[task].resolution = IMAGE_SIZE
    data[task].batch_size = 8
  config.eval.splits = [dict(name="synthetic_train", **stores["segmentation"])]
  config.eval.num_overlays = 2
  config.total_steps = 8
  config.optimizer.warmup_steps = 2
  config.optimizer.lr = 1e-3
  config.checkpoint = dict(every=2, keep=10, async_save=True)
  config.log_every = 2
  return config
