"""Data-parallel evaluation of one-step segmentation on every device of every host.

Each process reads its share of a split (padded so that all run the same number of steps),
the sharded model predicts mask logits for the global batch, and each process scores its own
rows at the samples' original resolution; the sums are then gathered over processes, with
padding never counted. Results per split: gIoU (= mIoU), cIoU (= oIoU), Prec@0.5..0.9, and
each sample's IoU (`{split}_per_sample.json`, in store order).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from genmask_jax.data import pipeline, records
from genmask_jax.data.resize import undo_resize
from genmask_jax.evaluation import metrics, reduce, report
from genmask_jax.models.genmask import Models
from genmask_jax.runs.model import segmenter
from genmask_jax.runtime import fileio, sharding
from genmask_jax.vlm.prompts import prompt_template

# Sub-results of a split by a boolean source field (ReasonSeg's short and long queries).
BREAKDOWNS = {"is_sentence": {False: "short", True: "long"}}


def _breakdown_labels(split: ml_collections.ConfigDict) -> dict:
  field = split.get("breakdown", "")
  if field and field not in BREAKDOWNS:
    raise ValueError(f"split {split.name}: breakdown {field!r} unknown; known {list(BREAKDOWNS)}")
  return BREAKDOWNS.get(field, {})


def per_sample_ious(
  reader: records.RecordReader, index: np.ndarray, i: np.ndarray, u: np.ndarray, valid: np.ndarray
) -> list[dict]:
  """Every sample's IoU, gathered from all processes, in store order."""
  gathered = multihost_utils.process_allgather(
    (np.asarray(index, np.int32), np.asarray(i, np.int32), np.asarray(u, np.int32), valid),
    tiled=True,
  )
  index, i, u, valid = (np.asarray(a) for a in gathered)
  iou = metrics.sample_iou(i, u)
  return [
    {"id": reader[int(index[k])]["id"], "iou": float(iou[k]), "intersection": int(i[k]),
     "union": int(u[k])}
    for k in sorted(np.flatnonzero(valid), key=lambda k: index[k])
  ]  # fmt: skip


def evaluate_split(
  split: ml_collections.ConfigDict,
  segment_fn,
  params: Any,
  vae_params: Any,
  config: ml_collections.ConfigDict,
  mesh,
) -> tuple[dict[str, metrics.IoUSums], list, list[dict]]:
  """Sums per (sub-)split, up to `config.eval.num_overlays` overlay samples (process 0) and
  the per-sample IoUs."""
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
  stats, groups, overlays, indices = [], [], [], []
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
    indices.append(np.asarray(batch["index"]))
    if labels:
      groups.append(np.array([bool(s["source"].get(split.breakdown)) for s in samples]))
    for k in np.flatnonzero(valid)[: config.eval.num_overlays - len(overlays)]:
      prediction = undo_resize(logits[k], size[k], resized[k]) > 0
      overlays.append((records.decode_image(samples[k]), masks[k], prediction))
  intersection, union, valid = (np.concatenate(a) for a in zip(*stats, strict=True))
  sums = {split.name: reduce.gather_sums(intersection, union, valid)}
  if labels:
    group = np.concatenate(groups)
    for value, label in labels.items():
      in_group = valid & (group == value)
      sums[f"{split.name}/{label}"] = reduce.gather_sums(intersection, union, in_group)
  per_sample = per_sample_ious(reader, np.concatenate(indices), intersection, union, valid)
  return sums, overlays, per_sample


def evaluate_params(
  models: Models,
  params: Any,
  vae_params: Any,
  config: ml_collections.ConfigDict,
  mesh,
  out_dir: str,
) -> dict[str, dict[str, float]]:
  """Evaluates every split of `config.eval.splits`; writes results.json, each split's
  per-sample IoUs and overlay grids."""
  segment_fn = segmenter(models, config)
  per_split, overlays, per_sample = {}, {}, {}
  for split in map(ml_collections.ConfigDict, config.eval.splits):
    sums, samples, per_sample[split.name] = evaluate_split(
      split, segment_fn, params, vae_params, config, mesh
    )
    per_split.update(sums)
    if samples:
      overlays[split.name] = samples
  results = metrics.results_by_split(per_split)
  if jax.process_index() == 0:
    report.write_results(results, os.path.join(out_dir, "results.json"))
    for name, rows in per_sample.items():
      fileio.write_json(os.path.join(out_dir, f"{name}_per_sample.json"), rows, indent=1)
    report.write_overlay_grids(overlays, out_dir, tile=config.eval.overlay_tile)
    logging.info("wrote %s", out_dir)
  return results
