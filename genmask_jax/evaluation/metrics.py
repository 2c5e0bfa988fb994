"""Referring-segmentation metrics: gIoU (= mIoU), cIoU (= oIoU) and Prec@0.5..0.9.

The unit is one (image, expression) sample. Per sample, over the pixels whose ground truth is
not IGNORE (255): I = |pred & gt|, U = |pred | gt|, IoU = I / U, and IoU = 1 when U == 0
(empty prediction of an empty target). gIoU is the mean per-sample IoU, cIoU = sum I / sum U,
Prec@t the fraction of samples with IoU >= t.

The per-sample and summing functions take the array module (`xp`: numpy on host, jax.numpy on
device) so the host and the data-parallel device paths share one definition. Precision hits
compare integers (10 I >= 10 t U), so they are exact and identical on host and device.
`IoUSums` accumulates in pure numpy; sums from any number of batches, devices or processes
merge by addition.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from genmask_jax.data.masks import FOREGROUND, IGNORE

PRECISION_TENTHS = (5, 6, 7, 8, 9)  # Prec@0.5 .. Prec@0.9, as integer tenths for exact tests.


def intersection_union(pred: Any, gt: Any, xp: Any = np) -> tuple[Any, Any]:
  """Per-sample I and U of binary predictions (..., H, W) bool against gt (..., H, W) in
  {0, 1, 255}; pixels with gt == 255 leave both counts."""
  if pred.shape != gt.shape:
    raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
  counted = gt != IGNORE
  target = gt == FOREGROUND
  intersection = xp.sum(pred & target & counted, axis=(-2, -1))
  union = xp.sum((pred | target) & counted, axis=(-2, -1))
  return intersection, union


def sample_iou(intersection: Any, union: Any, xp: Any = np) -> Any:
  """I / U per sample, 1.0 where U == 0."""
  return xp.where(union > 0, intersection / xp.maximum(union, 1), 1.0)


def sums(intersection: Any, union: Any, weight: Any, xp: Any = np) -> dict[str, Any]:
  """The additive statistics of a set of samples; weight (bool or 0/1) drops padding."""
  weight = xp.asarray(weight).astype(intersection.dtype)
  hits = [xp.sum((10 * intersection >= k * union) * weight) for k in PRECISION_TENTHS]
  return {
    "intersection": xp.sum(intersection * weight),
    "union": xp.sum(union * weight),
    "iou": xp.sum(sample_iou(intersection, union, xp) * weight),
    "count": xp.sum(weight),
    "hits": xp.stack(hits),
  }


@dataclasses.dataclass(frozen=True)
class IoUSums:
  """Additive statistics of a split: sum I, sum U, sum of per-sample IoU, samples, hits."""

  intersection: int = 0
  union: int = 0
  iou: float = 0.0
  count: int = 0
  hits: tuple[int, ...] = (0,) * len(PRECISION_TENTHS)

  @classmethod
  def from_sums(cls, s: Mapping[str, Any]) -> IoUSums:
    """From a `sums` dict (numpy or fetched device arrays); integers widened to Python ints."""
    return cls(
      intersection=int(s["intersection"]),
      union=int(s["union"]),
      iou=float(s["iou"]),
      count=int(s["count"]),
      hits=tuple(int(h) for h in np.asarray(s["hits"])),
    )

  @classmethod
  def of_samples(cls, intersection: Any, union: Any) -> IoUSums:
    """From per-sample I and U (every sample counts)."""
    intersection = np.asarray(intersection, np.int64)
    union = np.asarray(union, np.int64)
    if np.any(intersection > union) or np.any(intersection < 0):
      raise ValueError("per-sample statistics need 0 <= I <= U")
    return cls.from_sums(sums(intersection, union, np.ones_like(intersection)))

  def __add__(self, other: IoUSums) -> IoUSums:
    return IoUSums(
      intersection=self.intersection + other.intersection,
      union=self.union + other.union,
      iou=self.iou + other.iou,
      count=self.count + other.count,
      hits=tuple(a + b for a, b in zip(self.hits, other.hits, strict=True)),
    )

  def results(self) -> dict[str, float]:
    """gIoU, cIoU, Prec@t (fractions in [0, 1]) and the number of samples; cIoU is 1 when no
    sample has a union (all empty and correctly predicted empty)."""
    if self.count == 0:
      raise ValueError("no samples were evaluated")
    out = {
      "gIoU": self.iou / self.count,
      "cIoU": self.intersection / self.union if self.union else 1.0,
    }
    for k, h in zip(PRECISION_TENTHS, self.hits, strict=True):
      out[f"Prec@0.{k}"] = h / self.count
    out["samples"] = self.count
    return out


def merge(parts: Mapping[str, IoUSums], more: Mapping[str, IoUSums]) -> dict[str, IoUSums]:
  """Per-split sums of two sets of per-split sums (splits missing from one count as empty)."""
  return {k: parts.get(k, IoUSums()) + more.get(k, IoUSums()) for k in {**parts, **more}}


def results_by_split(per_split: Mapping[str, IoUSums]) -> dict[str, dict[str, float]]:
  return {split: s.results() for split, s in per_split.items()}
