"""Training metrics to TensorBoard, a JSON-lines file and the console (process 0 only).

The files are written through a `fileio.StagedFolder`: on a gs:// work directory they are
uploaded whole at each `flush()` (the trainer flushes at every checkpoint, so no step that a
resumed run will not repeat is ever lost) and at most every `SYNC_EVERY_S` at log steps.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from collections.abc import Mapping

import jax
from absl import logging

from genmask_jax.runtime import fileio

SYNC_EVERY_S = 60.0


def tensorboard_name(name: str) -> str:
  """`name` in the characters TensorBoard accepts ("Prec@0.5" -> "Prec_at_0.5")."""
  return re.sub(r"[^\w./-]", "_", name.replace("@", "_at_"))


class MetricWriter:
  """Writes scalars every call (TensorBoard events under `workdir/tensorboard`, one JSON line
  per step in `workdir/metrics.jsonl`); prints a console line every `log_every` steps.

  Only process 0 writes. A progress bar is shown when stdout is a terminal.
  """

  def __init__(self, workdir: str, total_steps: int, samples_per_step: int, log_every: int):
    self.active = jax.process_index() == 0
    self.total_steps, self.samples_per_step, self.log_every = (
      total_steps,
      samples_per_step,
      log_every,
    )
    self._tb = self._bar = self._jsonl = self._files = None
    if self.active:
      from tensorboardX import SummaryWriter

      self._files = fileio.StagedFolder(workdir, resume=("metrics.jsonl",))
      # Event files are named by second and host; a restart within that second would replace
      # the previous run's file on object storage.
      suffix = f".{uuid.uuid4().hex[:8]}"
      self._tb = SummaryWriter(
        os.path.join(self._files.local, "tensorboard"), filename_suffix=suffix
      )
      self._jsonl = open(os.path.join(self._files.local, "metrics.jsonl"), "a")
      self._synced_at = time.perf_counter()
      if sys.stdout.isatty():
        from tqdm import tqdm

        self._bar = tqdm(total=total_steps, unit="step")
    self._last: tuple[float, int] | None = None  # (time, step) of the last console line.

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.active:
      return
    scalars = dict(scalars)
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}", refresh=True)
    eta = ""
    if step % self.log_every == 0 or step == self.total_steps:
      now = time.perf_counter()
      if self._last is not None:
        steps_per_s = (step - self._last[1]) / (now - self._last[0])
        scalars.update(steps_per_s=steps_per_s, samples_per_s=steps_per_s * self.samples_per_step)
        eta = f" eta {(self.total_steps - step) / steps_per_s / 60:.1f} min"
      self._last = (now, step)
      text = " ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items()))
      logging.info("step %d/%d %s%s", step, self.total_steps, text, eta)
      if now - self._synced_at > SYNC_EVERY_S:
        self._record(step, scalars)
        self.flush()
        return
    self._record(step, scalars)

  def write_eval(self, step: int, results: Mapping[str, Mapping[str, float]]) -> None:
    """Evaluation results per split, as `eval/<split>/<metric>` scalars."""
    if self.active:
      self._record(step, {f"eval/{s}/{k}": v for s, r in results.items() for k, v in r.items()})

  def _record(self, step: int, scalars: Mapping[str, float]) -> None:
    for name, value in scalars.items():
      self._tb.add_scalar(tensorboard_name(name), value, step)
    self._jsonl.write(json.dumps(dict(scalars, step=step)) + "\n")
    self._jsonl.flush()

  def flush(self) -> None:
    """Publishes every line and event written so far (uploads them on gs://)."""
    if self.active:
      self._tb.flush()
      self._files.sync()
      self._synced_at = time.perf_counter()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._jsonl.close()
      self._files.close()
    if self._bar is not None:
      self._bar.close()
