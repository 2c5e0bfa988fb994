r"""The paper's ablations at toy scale on the synthetic set: one row per variant and seed.

  python -m benchmarks.ablations --workdir=runs/demo [--seeds=0,1] \
      [--only=s=0.1,no_generation_data_same_batch] [--config.x=y ...]

Reuses (or makes) the demo's data, VLM features and frozen VAE under --workdir, trains each
variant of the demo's config (configs/demo.py with any `--config.x=y` overrides, as for the demo;
e.g. `--config.total_steps=N`) with each seed (`config.seed`: data order, initialization, noise)
under --workdir/ablations/<name>/seed_<k> (a re-run resumes or skips finished runs) and evaluates
it on the held-out expressions. Prints the mean and the range over seeds. The paper's direction
need not reproduce at this scale; the table reports what is measured.
"""

from __future__ import annotations

import copy
import json
import os

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from genmask_jax import GenMask, demo
from genmask_jax.runtime import host_memory, log_filter
from genmask_jax.training import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Demo config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "The demo work directory to reuse.")
_ONLY = flags.DEFINE_list("only", [], "Variants to run, by slug (default: all); see --helpfull.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "config.seed of each run of a variant.")

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
  # Without generation data a step holds the same 8 segmentation samples and nothing else; the
  # second row restores the 16 samples per step with segmentation alone. In DiT tokens (a
  # segmentation sample carries as many condition tokens as noisy ones) the paper setting's step
  # is 8 x 128 + 8 x 64 = 1536 tokens, these 1024 and 2048: the two rows bracket its compute.
  "no generation data": {"data.generation.sources": []},
  "no generation data, same batch": {
    "data.generation.sources": [],
    "data.segmentation.global_batch_size": 16,
  },
}


def slug(name: str) -> str:
  """The variant's directory name and --only key: `no_generation_data_same_batch`."""
  return name.split(" (")[0].replace(",", "").replace(" ", "_")


def run_variant(name: str, overrides: dict, workdir: str, seed: int) -> dict[str, float]:
  config = copy.deepcopy(_CONFIG.value)
  demo.prepare(config, workdir)
  with config.unlocked():
    config.seed = seed
    for path, value in overrides.items():
      *parents, leaf = path.split(".")
      node = config
      for p in parents:
        node = node[p]
      node[leaf] = value
  run_dir = os.path.join(workdir, "ablations", slug(name), f"seed_{seed}")
  config_path, result_path = (os.path.join(run_dir, f) for f in ("config.json", "heldout.json"))
  # A run directory belongs to one config: another --config must not resume or reuse it.
  if os.path.exists(config_path):
    with open(config_path) as f:
      if json.load(f) != json.loads(config.to_json_best_effort()):
        raise ValueError(f"{run_dir} holds a run of another config ({config_path}); move it away")
  else:
    os.makedirs(run_dir, exist_ok=True)
    with open(config_path, "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  train.train(config, run_dir)
  results = GenMask.open(run_dir).evaluate()
  with open(result_path, "w") as f:
    json.dump(results["heldout"], f)
  logging.info("%s, seed %d: held-out mIoU %.3f", name, seed, results["heldout"]["gIoU"])
  return results["heldout"]


def main(argv: list[str]) -> None:
  del argv
  log_filter.quiet_library_logs()
  workdir = os.path.abspath(_WORKDIR.value)
  unknown = set(_ONLY.value) - {slug(n) for n in VARIANTS}
  if unknown:
    raise app.UsageError(f"--only {sorted(unknown)}: variants are {[slug(n) for n in VARIANTS]}")
  names = [n for n in VARIANTS if not _ONLY.value or slug(n) in _ONLY.value]
  seeds = [int(s) for s in _SEEDS.value]
  rows = {n: [run_variant(n, VARIANTS[n], workdir, s) for s in seeds] for n in names}
  steps, device = _CONFIG.value.total_steps, jax.devices()[0].device_kind
  print(f"\nToy-scale ablations, {steps} steps, seeds {seeds}, held-out expressions ({device})")
  print(f"{'variant':34s} {'mIoU (min-max)':>20s} {'oIoU':>7s} {'P@0.5':>7s}")
  for name, runs in rows.items():
    miou = [r["gIoU"] for r in runs]
    mean = lambda key, runs=runs: np.mean([r[key] for r in runs])
    spread = f"{np.mean(miou):.3f} ({min(miou):.3f}-{max(miou):.3f})"
    print(f"{name:34s} {spread:>20s} {mean('cIoU'):7.3f} {mean('Prec@0.5'):7.3f}")


if __name__ == "__main__":
  host_memory.restart_with_huge_pages()
  app.run(main)
