"""The demo, shortened, end to end: data, tiny VLM features, VAE, DiT, evaluation, generation."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

SHORT = [
  "--config.demo.num_train=200",
  "--config.demo.num_gen=200",
  "--config.demo.num_heldout=32",
  "--config.demo.num_generate=4",
  "--config.demo.vae_steps=60",
  "--config.total_steps=80",
  "--config.checkpoint.every=40",
  "--config.log_every=20",
  "--config.generate.num_steps=4",
]


def losses(workdir: str, key: str) -> np.ndarray:
  with open(os.path.join(workdir, "genmask", "metrics.jsonl")) as f:
    return np.array([r[key] for r in map(json.loads, f) if key in r])


@pytest.mark.slow
def test_short_demo_runs_learns_and_resumes(tmp_path):
  workdir = str(tmp_path / "demo")
  command = [sys.executable, "-m", "launch.demo", f"--workdir={workdir}", *SHORT]
  env = dict(os.environ, XLA_FLAGS="")  # One CPU device, as a user runs it.
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1500)
  assert result.returncode == 0, result.stderr[-3000:]

  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert set(summary) == {
    "GenMask (trained)",
    "GenMask (initialization)",
    "every shape",
    "largest shape",
  }
  assert all(0 <= row["gIoU"] <= 1 for row in summary.values())
  assert "mIoU (gIoU)" in result.stdout and workdir in result.stdout
  segmentation = losses(workdir, "loss/segmentation")
  assert len(segmentation) == 80
  assert segmentation[-20:].mean() < 0.8 * segmentation[:20].mean()  # The DiT learns.
  assert Image.open(os.path.join(workdir, "generated.png")).size == (4 * 64, 2 * 64)
  assert os.path.exists(os.path.join(workdir, "eval", "heldout_overlays.png"))
  assert os.listdir(os.path.join(workdir, "genmask", "tensorboard"))

  # Re-running continues from what exists: no data, features, VAE or DiT steps are redone.
  again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1500)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "VAE step" not in again.stderr and "precompute" not in again.stderr
  assert len(losses(workdir, "loss/segmentation")) == 80
