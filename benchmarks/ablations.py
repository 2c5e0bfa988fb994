r"""The paper's ablations at toy scale on the synthetic set: one row per variant.

  python -m benchmarks.ablations --workdir=runs/demo [--steps=N] [--only="s=0.1,s=0.5"]

Reuses (or makes) the demo's data, VLM features and frozen VAE under --workdir, trains each
variant of configs/demo.py for --steps steps (default: the demo's) under
--workdir/ablations/<name> (a re-run resumes or skips finished variants) and evaluates it on the
held-out expressions. The paper's direction need not reproduce at this scale; the table reports
what is measured.
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags, logging

from configs.demo import get_config
from genmask_jax.evaluation import evaluate
from genmask_jax.runtime import log_filter
from genmask_jax.training import train
from launch import demo

_STEPS = flags.DEFINE_integer("steps", 0, "Training steps per variant (0: the demo's).")
_ONLY = flags.DEFINE_list("only", [], "Variants to run (default: all).")

# name -> config overrides (dotted path -> value); the first row is the paper's setting.
VARIANTS = {
  "s=0.05 (paper)": {},
  "s=0.1": {"diffusion.timesteps.segmentation.shift": 0.1},
  "s=0.5": {"diffusion.timesteps.segmentation.shift": 0.5},
  "no condition tokens": {"diffusion.use_condition_tokens": False},
  "BCE through the VAE decoder": {"diffusion.segmentation_loss": "vae_bce"},
  "BCE after a linear head": {
    "diffusion.segmentation_loss": "linear_bce",
    "segment.decoder": "linear",
  },
  "no generation data": {"data.generation.sources": []},
}


def run_variant(name: str, overrides: dict, workdir: str, steps: int) -> dict[str, float]:
  config = get_config()
  demo.prepare(config, workdir)
  with config.unlocked():
    config.total_steps = steps
    for path, value in overrides.items():
      *parents, leaf = path.split(".")
      node = config
      for p in parents:
        node = node[p]
      node[leaf] = value
  run_dir = os.path.join(workdir, "ablations", name.split(" (")[0].replace(" ", "_"))
  result_path = os.path.join(run_dir, "heldout.json")
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  train.train(config, run_dir)
  results = evaluate.evaluate(config, run_dir)
  with open(result_path, "w") as f:
    json.dump(results["heldout"], f)
  logging.info("%s: held-out mIoU %.3f", name, results["heldout"]["gIoU"])
  return results["heldout"]


def main(argv: list[str]) -> None:
  del argv
  log_filter.quiet_library_logs()
  workdir = os.path.abspath(demo.WORKDIR.value)
  names = [n for n in VARIANTS if not _ONLY.value or n in _ONLY.value]
  steps = _STEPS.value or get_config().total_steps
  rows = {n: run_variant(n, VARIANTS[n], workdir, steps) for n in names}
  device = jax.devices()[0].device_kind
  print(f"\nToy-scale ablations, {steps} steps each, held-out expressions ({device})")
  print(f"{'variant':32s} {'mIoU':>7s} {'oIoU':>7s} {'P@0.5':>7s}")
  for name, r in rows.items():
    print(f"{name:32s} {r['gIoU']:7.3f} {r['cIoU']:7.3f} {r['Prec@0.5']:7.3f}")


if __name__ == "__main__":
  app.run(main)
