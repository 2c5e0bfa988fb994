"""The README's first command as printed, at full length (~12 minutes on 2 cores): not part of
the default run (`addopts` in pyproject.toml); CI runs it after the suite with
`pytest -m full_demo`, on a CPU other than the one docs/results.md's figures come from."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import DEMO_ENV
from PIL import Image
from user_scenes import read_mask, shape_coverage, user_scene

# Measured on a 2-core CPU over seeds 0, 1, 2 (docs/results.md): held-out mIoU 0.807-0.849, training
# scenes 0.806-0.879, baselines <= 0.35; named-colour recall 0.720-0.752 (untrained 0.035-0.287:
# it depends on the initialization), precision 0.913-0.971 (untrained 0.46-0.61).
# Another CPU rounds like another seed: the floors sit well below the worst seed, so a miss here
# is a broken demo, not an unlucky seed.
HELDOUT_MIOU = 0.70
TRAIN_MIOU = 0.70
OVER_BASELINES = 0.3
RECALL = 0.6
RECALL_OVER_UNTRAINED = 0.2
PRECISION = 0.8
# launch.predict on the first six training scenes redrawn at 140 x 200 and 91 x 37 (letterboxed to
# a smaller scale than any training scene), seeds 0 / 1 / 2: the target covered 0.83 / 0.93 / 0.94
# on average, the most-covered other shape 0.20 / 0.14 / 0.13 (one spill of 0.86 on a 91 x 37
# image).
USER_TARGET = 0.7
USER_TARGET_OVER_OTHERS = 0.5


@pytest.mark.full_demo
def test_the_demo_keeps_the_readme_promise(tmp_path):
  workdir = str(tmp_path / "demo")
  command = [sys.executable, "-m", "launch.demo", f"--workdir={workdir}"]
  result = subprocess.run(command, env=DEMO_ENV, capture_output=True, text=True, timeout=3600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  print(json.dumps(summary, indent=1))
  trained = summary["GenMask (trained)"]
  baselines = max(summary[b]["heldout"]["gIoU"] for b in ("every shape", "largest shape"))
  assert trained["heldout"]["gIoU"] >= HELDOUT_MIOU
  assert trained["train"]["gIoU"] >= TRAIN_MIOU
  assert trained["heldout"]["gIoU"] >= baselines + OVER_BASELINES
  generation = summary["generation"]
  untrained = generation["GenMask (initialization)"]
  recall = generation["GenMask (trained)"]["recall"]
  assert recall >= max(RECALL, untrained["recall"] + RECALL_OVER_UNTRAINED)
  assert generation["GenMask (trained)"]["precision"] >= PRECISION

  # The user's path: images of other sizes and aspect ratios, segmented with --workdir alone.
  scenes = [user_scene(i, *size) for i in range(6) for size in ((140, 200), (91, 37))]
  command = [sys.executable, "-m", "launch.predict", f"--workdir={workdir}/genmask"]
  command += [f"--vlm={workdir}/tiny_qwen", f"--out={tmp_path}/masks"]
  for k, (image, _, text) in enumerate(scenes):
    Image.fromarray(image).save(tmp_path / f"user_{k}.png")
    command += [f"--image={tmp_path}/user_{k}.png", f"--text={text}"]
  result = subprocess.run(command, env=DEMO_ENV, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  covered = [
    shape_coverage(image, read_mask(tmp_path / "masks" / f"{k:03d}_user_{k}_mask.png"), target)
    for k, (image, target, _) in enumerate(scenes)
  ]
  target, others = np.mean([c[0] for c in covered]), np.mean([max(c[1:]) for c in covered])
  print(f"user images: the target covered {target:.3f}, the most-covered other {others:.3f}")
  assert target >= USER_TARGET and target - others >= USER_TARGET_OVER_OTHERS
