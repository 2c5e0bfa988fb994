"""The trainer tests' config: tiny models on `training_data` stores.

Arg: the stores' root, optionally followed by ",latents": the training sources then name latent
stores under the root (written by launch/precompute_latents.py).
"""

from __future__ import annotations

import os

import ml_collections
from training_data import ENCODER, IMAGE_SIZE, TEXT_LEN, make_stores

from configs.genmask import get_config as genmask_config


def get_config(arg: str) -> ml_collections.ConfigDict:
  root, *options = arg.split(",")
  config = genmask_config("tiny")
  stores = make_stores(root)
  data = config.data
  data.encoder_model_id, data.text_len, data.num_threads = ENCODER, TEXT_LEN, 2
  for task in ("segmentation", "generation"):
    latents = {"latents": os.path.join(root, f"{task}_latents")} if "latents" in options else {}
    data[task].sources = [dict(stores[task], **latents)]
    data[task].resolution = IMAGE_SIZE
    data[task].global_batch_size = 8
  config.eval.splits = [dict(name="synthetic_train", **stores["segmentation"])]
  config.eval.num_overlays = 2
  config.total_steps = 8
  config.optimizer.warmup_steps = 2
  config.optimizer.lr = 1e-3
  config.checkpoint = dict(every=2, keep=10, async_save=True)
  config.log_every = 2
  return config
