"""Data-parallel evaluation of one-step segmentation on every device of every host.

Each process reads its share of a split (padded so that all run the same number of steps),
the sharded model predicts mask logits for the global batch, and each process scores its own
rows at the samples' original resolution; the sums are then gathered over processes, with
padding never counted. Results per split: gIoU (= mIoU), cIoU (= oIoU), Prec@0.5..0.9.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import linen as nn
from tqdm import tqdm

from genmask_jax import inference, metrics, sharding
from genmask_jax.data import pipeline, records
from genmask_jax.evaluation import reduce, report, resize
from genmask_jax.genmask import Models
from genmask_jax.vlm.prompts import prompt_template

# Sub-results of a split by a boolean source field (ReasonSeg's short and long queries).
BREAKDOWNS = {"is_sentence": {False: "short", True: "long"}}


def _breakdown_labels(split: ml_collections.ConfigDict) -> dict:
  field = split.get("breakdown", "")
  if field and field not in BREAKDOWNS:
    raise ValueError(f"split {split.name}: breakdown {field!r} unknown; known {list(BREAKDOWNS)}")
  return BREAKDOWNS.get(field, {})


def evaluate_split(
  split: ml_collections.ConfigDict,
  segment_fn,
  params: Any,
  vae_params: Any,
  config: ml_collections.ConfigDict,
  mesh,
) -> tuple[dict[str, metrics.IoUSums], list]:
  """Sums per (sub-)split and up to `config.eval.num_overlays` overlay samples (process 0)."""
  template = prompt_template(reasoning=split.get("reasoning", False))
  dataset = pipeline.eval_dataset(
    config.data,
    split.records,
    split.features,
    batch_size=config.eval.batch_size,
    template=template,
  )
  reader = records.RecordReader(split.records)
  labels = _breakdown_labels(split)
  stats, groups, overlays = [], [], []
  show = jax.process_index() == 0 and sys.stdout.isatty()
  for batch in tqdm(dataset, desc=split.name, disable=not show, unit="batch"):
    inputs = sharding.global_batch({k: batch[k] for k in ("image", "text", "text_mask")}, mesh)
    predicted = segment_fn(params, vae_params, inputs["image"], inputs["text"], inputs["text_mask"])
    logits = reduce.local_rows(predicted)
    samples = [reader[int(i)] for i in batch["index"]]
    masks = [records.decode_mask(s) for s in samples]
    ids = [s["id"] for s in samples]
    valid = np.asarray(batch["valid"])
    size, resized = np.asarray(batch["size"]), np.asarray(batch["resized_size"])
    i, u = reduce.stats_at_original(logits, masks, size, resized, valid, ids)
    stats.append((i, u, valid))
    if labels:
      groups.append(np.array([bool(s["source"].get(split.breakdown)) for s in samples]))
    for k in np.flatnonzero(valid)[: config.eval.num_overlays - len(overlays)]:
      prediction = resize.undo_resize(logits[k], size[k], resized[k]) > 0
      overlays.append((records.decode_image(samples[k]), masks[k], prediction))
  intersection, union, valid = (np.concatenate(a) for a in zip(*stats, strict=True))
  sums = {split.name: reduce.gather_sums(intersection, union, valid)}
  if labels:
    group = np.concatenate(groups)
    for value, label in labels.items():
      in_group = valid & (group == value)
      sums[f"{split.name}/{label}"] = reduce.gather_sums(intersection, union, in_group)
  return sums, overlays


def evaluate_params(
  models: Models,
  params: Any,
  vae_params: Any,
  config: ml_collections.ConfigDict,
  mesh,
  out_dir: str,
) -> dict[str, dict[str, float]]:
  """Evaluates every split of `config.eval.splits`; writes results.json and overlay grids."""
  segment_fn = inference.segmenter(models, config)
  per_split, overlays = {}, {}
  for split in map(ml_collections.ConfigDict, config.eval.splits):
    sums, samples = evaluate_split(split, segment_fn, params, vae_params, config, mesh)
    per_split.update(sums)
    if samples:
      overlays[split.name] = samples
  results = metrics.results_by_split(per_split)
  if jax.process_index() == 0:
    report.write_results(results, os.path.join(out_dir, "results.json"))
    report.write_overlay_grids(overlays, out_dir, tile=config.eval.overlay_tile)
    logging.info("wrote %s", out_dir)
  return results


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> Mapping[str, Mapping[str, float]]:
  """`--mode=eval`: the latest checkpoint under `workdir` (or `config.init.weights`)."""
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.get("sharding"))
  models = Models.from_config(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params, vae_params = inference.restore_params(config, workdir, models, mesh, rules)
    return evaluate_params(models, params, vae_params, config, mesh, os.path.join(workdir, "eval"))
