"""README.md's Python API, run as printed on the shortened demo: the command that saves a
held-out scene, then the Python block that segments it. Its mask scores the IoU the demo's
evaluation recorded for that scene."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import DEMO_ENV
from user_scenes import read_mask

from genmask_jax.data import records
from genmask_jax.evaluation import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def api_section() -> tuple[str, str]:
  """(the bash command, the Python block) of the README's "## The Python API" section."""
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  section = re.split(r"\n## ", readme.split("\n## The Python API\n", 1)[1], maxsplit=1)[0]
  (command,) = re.findall(r"^```bash\n(.*?)^```", section, re.M | re.S)
  (block,) = re.findall(r"^```python\n(.*?)^```", section, re.M | re.S)
  return command.strip(), block


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_the_readme_block_segments_a_scene_as_its_evaluation_did(short_demo, tmp_path):
  demo = short_demo[0]
  command, block = api_section()
  assert len([line for line in block.splitlines() if line.strip()]) == 5, block
  # The README's paths, relative to a checkout holding the demo under runs/demo.
  os.makedirs(tmp_path / "runs" / "demo")
  for name in ("genmask", "tiny_qwen", "data"):
    os.symlink(os.path.join(demo, name), tmp_path / "runs" / "demo" / name)
  os.symlink(os.path.dirname(os.path.dirname(sys.executable)), tmp_path / ".venv")
  env = dict(DEMO_ENV, PYTHONPATH=REPO)
  for args in (["bash", "-c", command], [sys.executable, "-c", block]):
    result = subprocess.run(
      args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]

  scene = records.RecordReader(os.path.join(demo, "data", "heldout"))[1]
  mask = read_mask(tmp_path / "runs" / "demo" / "scene_mask.png")
  assert mask.shape == (scene["height"], scene["width"])
  intersection, union = metrics.intersection_union(mask, records.decode_mask(scene))
  with open(os.path.join(demo, "eval", "heldout_per_sample.json")) as f:
    evaluated = {row["id"]: row for row in json.load(f)}[scene["id"]]
  assert (int(intersection), int(union)) == (evaluated["intersection"], evaluated["union"])
  assert float(metrics.sample_iou(intersection, union)) == pytest.approx(evaluated["iou"])
  assert np.any(mask), "an empty mask would not test the model"
