"""LISA's semantic sampling: every use of an image draws its classes anew.

A semantic store converted with every class of each image (`prepare_data ade20k
--classes_per_image=0`: one sample per (image, class), ids `DATASET/SPLIT/IMAGE/CLASS`) is read
through `ClassDraws` when its source sets `classes_per_use: k`. An epoch holds min(k, classes)
slots per image; epoch e fills image g's slots with k of its classes drawn without replacement
by a generator seeded with (seed, e, g). The draw is a function of the stream position only, so
it differs between epochs, is the same on any number of processes and resumes exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from genmask_jax.data.store import StoreError


class ClassDraws:
  """Slots of one epoch -> rows of the store; `row(slot, epoch)`."""

  def __init__(self, ids: Sequence[str], per_use: int, seed: int, where: str):
    if per_use < 1:
      raise StoreError(f"{where}: classes_per_use must be >= 1, got {per_use}")
    groups: dict[str, list[int]] = {}
    for row, sample_id in enumerate(ids):
      image, sep, _ = sample_id.rpartition("/")
      if not sep:
        raise StoreError(
          f"{where}: sample {sample_id!r} is not IMAGE/CLASS; classes_per_use needs a store "
          "of one sample per (image, class), as prepare_data writes for semantic sets"
        )
      groups.setdefault(image, []).append(row)
    self._groups = [np.asarray(rows) for rows in groups.values()]
    self._per_use, self._seed = per_use, seed
    self._slots = np.asarray(
      [(g, r) for g, rows in enumerate(self._groups) for r in range(min(per_use, len(rows)))]
    )

  def __len__(self) -> int:
    return len(self._slots)

  def row(self, slot: int, epoch: int) -> int:
    group, rank = self._slots[slot]
    rows = self._groups[group]
    if len(rows) <= self._per_use:  # Every class, every epoch.
      return int(rows[rank])
    rng = np.random.default_rng([self._seed, epoch, group])
    return int(rows[rng.choice(len(rows), self._per_use, replace=False)[rank]])
