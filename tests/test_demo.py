"""A shortened demo end to end (data, tiny VLM features, VAE, DiT, evaluation, generation)."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

# Trained for a few hundred steps, the DiT must beat its own initialization on held-out
# expressions by at least this much mIoU (at initialization it is ~0).
MARGIN = 0.02

SHORT = [
    "--config.demo.num_train=400",
    "--config.demo.num_gen=400",
    "--config.demo.num_heldout=64",
    "--config.demo.num_generate=4",
    "--config.demo.vae_steps=200",
    "--config.total_steps=250",
    "--config.checkpoint.every=125",
    "--config.log_every=50",
]


@pytest.mark.slow
def test_short_demo_learns(tmp_path):
  workdir = str(tmp_path / "demo")
  command = [sys.executable, "-m", "launch.demo", f"--workdir={workdir}", *SHORT]
  result = subprocess.run(command, capture_output=True, text=True, timeout=1500)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  trained, untrained = summary["GenMask (trained)"], summary["GenMask (initialization)"]
  assert trained["gIoU"] > untrained["gIoU"] + MARGIN, summary
  assert set(summary) >= {"every shape", "largest shape"}
  assert "mIoU (gIoU)" in result.stdout and workdir in result.stdout
  assert Image.open(os.path.join(workdir, "generated.png")).size == (4 * 64, 2 * 64)
  assert os.path.exists(os.path.join(workdir, "eval", "heldout_overlays.png"))
  assert os.listdir(os.path.join(workdir, "genmask", "tensorboard"))

  # Re-running continues from what exists: nothing is trained again.
  again = subprocess.run(command, capture_output=True, text=True, timeout=1500)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "VAE step" not in again.stderr and "step 50/" not in again.stderr
