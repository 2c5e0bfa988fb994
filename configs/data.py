"""The data section of an experiment config, read by genmask_jax/data/pipeline.py.

Plain ml_collections: building a config imports no data-loading code.
"""

from __future__ import annotations

import ml_collections

from genmask_jax.vlm.prompts import prompt_template


def default_config() -> ml_collections.ConfigDict:
  """Sample and feature stores (launch/prepare_data.py, launch/precompute_vlm.py) per task."""

  def task() -> dict:
    return dict(
      # Each source: {"records": sample store dir, "features": feature store dir,
      # "latents": optional latent store dir (all or none of a task's sources have one),
      # "weight": optional mixing weight (all or none of a task's sources have one),
      # "classes_per_use": k draws k of an image's classes per use (LISA; semantic stores
      # converted with every class, data/class_draws.py)}.
      sources=[],
      resolution=512,
      global_batch_size=8,  # Over all processes; the same for both tasks (mixed 1:1).
    )

  return ml_collections.ConfigDict(
    dict(
      seed=0,
      text_len=512,
      text_dtype="float32",  # bfloat16 halves host memory; the DiT casts anyway.
      encoder_model_id="Qwen2.5-VL-7B-Instruct",
      prompt_template=prompt_template(),
      num_workers=0,  # grain worker processes per host; 0 reads in this process.
      num_threads=8,  # Reader threads per process / worker.
      prefetch_buffer_size=32,  # Examples read ahead per process / worker.
      segmentation=task(),
      generation=task(),
    )
  )
