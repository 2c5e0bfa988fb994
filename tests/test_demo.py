"""The demo, shortened, end to end: data, tiny VLM features, VAE, DiT, evaluation, generation."""

import json
import os
import subprocess

import ml_collections
import numpy as np
import pytest
from conftest import DEMO_ENV, short_demo_command
from PIL import Image

from launch import demo as launch_demo

STEPS = 400
# mIoU on the training scenes: measured 0.779 after training, 0.000 at initialization, and 0.389
# / 0.438 for the every-shape / largest-shape baselines (2-core CPU).
LEARNED_MARGIN = 0.4  # Over initialization.
TEXT_MARGIN = 0.1  # Over the better baseline: the masks follow the text.


def losses(workdir: str, key: str) -> np.ndarray:
  with open(os.path.join(workdir, "genmask", "metrics.jsonl")) as f:
    return np.array([r[key] for r in map(json.loads, f) if key in r])


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_short_demo_runs_learns_and_resumes(short_demo):
  """The demo, shortened: every stage runs, the DiT learns to segment its training scenes (mIoU
  over initialization and over both baselines, margins above), and a re-run redoes nothing."""
  workdir, result = short_demo

  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  generation = summary.pop("generation")
  assert set(summary) == {
    "GenMask (trained)",
    "GenMask (initialization)",
    "every shape",
    "largest shape",
  }
  assert all(0 <= r[split]["gIoU"] <= 1 for r in summary.values() for split in ("heldout", "train"))
  assert "mIoU (gIoU)" in result.stdout and workdir in result.stdout
  fit = {name: r["train"]["gIoU"] for name, r in summary.items()}
  print("training-scene mIoU:", fit)
  assert fit["GenMask (trained)"] >= fit["GenMask (initialization)"] + LEARNED_MARGIN
  assert fit["GenMask (trained)"] >= max(fit["every shape"], fit["largest shape"]) + TEXT_MARGIN
  for task in ("segmentation", "generation"):
    loss = losses(workdir, f"loss/{task}")
    assert len(loss) == STEPS
    assert loss[-20:].mean() < 0.8 * loss[:20].mean(), task
  assert Image.open(os.path.join(workdir, "generated.png")).size == (8 * 64, 2 * 64)
  # Generation: the colours the captions name, in the images (evaluation/colours.py).
  print("generation:", generation)
  assert generation["real scenes"] == {"recall": 1.0, "precision": 1.0}
  assert set(generation) == {
    "GenMask (trained)",
    "GenMask (initialization)",
    "real scenes",
    "VAE round trip",
  }
  # No colour measure here: the shortened demo's 600-step VAE keeps none of the colours (its
  # round trip scores recall 0.0; the full demo's 0.997), so neither can its images.
  # tests/test_full_demo.py checks the full demo's images against the untrained model's.
  assert os.path.exists(os.path.join(workdir, "eval", "heldout_overlays.png"))
  assert os.listdir(os.path.join(workdir, "genmask", "tensorboard"))

  # Re-running continues from what exists: no data, features, VAE or DiT steps are redone.
  again = subprocess.run(
    short_demo_command(workdir), env=DEMO_ENV, capture_output=True, text=True, timeout=1500
  )
  assert again.returncode == 0, again.stderr[-3000:]
  assert "VAE step" not in again.stderr and "precompute" not in again.stderr
  assert len(losses(workdir, "loss/segmentation")) == STEPS


def test_demo_refuses_stores_of_another_size(tmp_path):
  """A re-run reuses the demo's sample stores; one made for other sizes is refused by name."""
  demo = ml_collections.ConfigDict(
    dict(num_train=4, num_heldout=2, num_gen=2, num_generate=2, num_eval_train=2, image_size=32)
  )
  data_dir = str(tmp_path / "data")
  launch_demo.make_data(demo, data_dir)
  launch_demo.make_data(demo, data_dir)  # Nothing to redo, nothing refused.
  demo.num_generate = 3
  with pytest.raises(ValueError, match=r"gen_heldout holds 2 samples .*demo.num_generate is 3"):
    launch_demo.make_data(demo, data_dir)
