r"""How the segmentation sampler's settings move the result: held-out scores of a trained run for
each start time t, noise and number of Euler steps.

  python -m benchmarks.one_step --workdir=runs/demo/genmask [--split=heldout]

Opens the run (`GenMask`, its own config) and evaluates one split for every setting of
`config.segment` in the grid: t in --times, noise gaussian / zeros at one step, and --steps Euler
steps from t = 1 with Gaussian noise. Prints one row per setting and writes them to
`<workdir>/one_step.json`.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags

from genmask_jax import GenMask
from genmask_jax.runtime import fileio, log_filter

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir.", required=True)
_SPLIT = flags.DEFINE_string("split", "heldout", "Which of the run's eval splits to score.")
_TIMES = flags.DEFINE_list("times", ["1.0", "0.99", "0.95", "0.9"], "Start times t (one step).")
_STEPS = flags.DEFINE_list("steps", ["2", "4"], "Euler step counts from t = 1 (Gaussian noise).")


def settings() -> list[dict]:
  """config.segment overrides: one step at each t and noise, then more steps at t = 1."""
  grid = [
    dict(t=float(t), noise=noise, steps=1) for noise in ("gaussian", "zeros") for t in _TIMES.value
  ]
  return grid + [dict(t=1.0, noise="gaussian", steps=int(n)) for n in _STEPS.value]


def main(argv: list[str]) -> None:
  del argv
  log_filter.quiet_library_logs()
  model = GenMask.open(_WORKDIR.value)
  rows = []
  print(f"{'t':>5s} {'noise':>8s} {'steps':>5s} {'mIoU':>6s} {'oIoU':>6s} {'P@0.5':>6s} {'s':>5s}")
  with tempfile.TemporaryDirectory() as out:
    for setting in settings():
      model.config.segment.update(setting)  # Read by each evaluation's segmenter.
      start = time.time()
      result = model.evaluate(_SPLIT.value, out_dir=out)[_SPLIT.value]
      row = dict(setting, **{k: result[k] for k in ("gIoU", "cIoU", "Prec@0.5")})
      row["seconds"] = time.time() - start
      rows.append(row)
      print(
        f"{row['t']:5.2f} {row['noise']:>8s} {row['steps']:5d} {row['gIoU']:6.3f} "
        f"{row['cIoU']:6.3f} {row['Prec@0.5']:6.3f} {row['seconds']:5.1f}"
      )
  fileio.write_json(os.path.join(_WORKDIR.value, "one_step.json"), rows, indent=2)


if __name__ == "__main__":
  app.run(main)
