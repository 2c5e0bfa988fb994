"""A run directory describes itself (genmask_jax/inference/run.py): after the shortened demo,
predict, generate and --mode=eval need only --workdir, give the evaluation's own results, accept
user images of any size, and refuse a swapped VAE or a change to the model's size by name."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from user_scenes import read_mask, shape_coverage, user_scene

from genmask_jax.conversion import weights
from genmask_jax.data import records
from genmask_jax.evaluation import metrics
from genmask_jax.inference import run
from genmask_jax.models.genmask import Models
from genmask_jax.runtime import sharding

# The shortened demo fits its 64 training scenes and generalizes little: its first training
# scene, redrawn at 128 x 128 and 96 x 96, is found (measured over seeds 0-2, scenes 0-5: 79-99%
# of the target covered, none of the others). Redrawn at another aspect ratio the scene is
# letterboxed to a smaller scale, which this model has not learned (seed 2: 0-60% of the target at
# 140 x 200); there only the mask's size is checked here, and tests/test_full_demo.py checks the
# full demo's masks on such images.
TARGET_COVERED = 0.5
OTHERS_COVERED = 0.1
DEMO_ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")


def command(module: str, *args: str) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, "-m", module, *args],
    env=DEMO_ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
  stdout, stderr = process.communicate(timeout=900)
  return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def succeeded(process: subprocess.Popen) -> str:
  result = finish(process)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@pytest.fixture(scope="module")
def demo(short_demo):
  """The shortened demo's work directory (tests/conftest.py)."""
  return short_demo[0]


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_predict_with_the_workdir_alone_reproduces_the_evaluation(demo, tmp_path):
  """Held-out scenes written as PNG files and segmented by launch.predict with --workdir,
  --vlm, --image and --text only: the same per-sample IoU as the demo's evaluation; user images
  of other sizes get masks at their own size, on the target shape."""
  run_dir, vlm = os.path.join(demo, "genmask"), os.path.join(demo, "tiny_qwen")
  reader = records.RecordReader(os.path.join(demo, "data", "heldout"))
  images, texts = [], []
  for i in range(len(reader)):
    path = str(tmp_path / f"heldout_{i:03d}.png")
    Image.fromarray(records.decode_image(reader[i])).save(path)
    images.append(f"--image={path}")
    texts.append(f"--text={reader[i]['text']}")
  user = {
    "large": user_scene(0, 128, 128),
    "odd": user_scene(0, 96, 96),
    "wide": user_scene(0, 140, 200),  # Where its mask lands: tests/test_full_demo.py.
  }
  for name, (image, _, text) in user.items():
    Image.fromarray(image).save(tmp_path / f"{name}.png")
    images.append(f"--image={tmp_path / name}.png")
    texts.append(f"--text={text}")
  out = str(tmp_path / "predicted")
  stdout = succeeded(
    command("launch.predict", f"--workdir={run_dir}", f"--vlm={vlm}", *images, *texts,
            f"--out={out}")
  )  # fmt: skip
  assert out in stdout

  with open(os.path.join(demo, "eval", "heldout_per_sample.json")) as f:
    evaluated = {row["id"]: row["iou"] for row in json.load(f)}
  assert len(evaluated) == len(reader)
  ious = []
  for i in range(len(reader)):
    predicted = read_mask(os.path.join(out, f"{i:03d}_heldout_{i:03d}_mask.png"))
    intersection, union = metrics.intersection_union(predicted, records.decode_mask(reader[i]))
    ious.append(float(metrics.sample_iou(intersection, union)))
  expected = [evaluated[reader[i]["id"]] for i in range(len(reader))]
  print("held-out IoU, predict vs evaluation:", np.mean(ious), np.mean(expected))
  np.testing.assert_allclose(ious, expected, atol=1e-6)

  for k, (name, (image, target, _)) in enumerate(user.items(), start=len(reader)):
    predicted = read_mask(os.path.join(out, f"{k:03d}_{name}_mask.png"))
    assert predicted.shape == image.shape[:2]
    covered = shape_coverage(image, predicted, target)
    print(f"{name} {image.shape[:2]}: covers the target {covered[0]:.2f}, the others {covered[1:]}")
    if name != "wide":
      assert covered[0] > TARGET_COVERED and max(covered[1:]) < OTHERS_COVERED, name


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_a_changed_model_or_a_swapped_vae_is_refused(demo, tmp_path):
  """predict, generate and --mode=eval refuse another DiT size and another VAE, naming the
  field (or the VAE) and the run; nothing is written."""
  run_dir = os.path.join(demo, "genmask")
  record = run.read_record(run_dir)
  swapped = str(tmp_path / "other_vae")  # A VAE of the same architecture, other weights.
  models = Models.from_config(run.config_from_dict(record["config"]))
  init = jax.jit(lambda rng: sharding.strip_axis_names(models.init_vae_params(rng)))
  weights.save(swapped, "vae", jax.device_get(init(jax.random.key(7))))

  out = tmp_path / "out"
  workdir = f"--workdir={run_dir}"
  predict = ["launch.predict", workdir, f"--vlm={demo}/tiny_qwen", "--out", str(out)]
  image = tmp_path / "scene.png"
  Image.fromarray(user_scene(0, 64, 64)[0]).save(image)
  predict += [f"--image={image}", "--text=the circle"]
  generate = ["launch.generate", workdir, f"--vlm={demo}/tiny_qwen", "--prompt=a red circle"]
  generate.append(f"--out={out}/g.png")
  evaluate = ["genmask_jax.main", "--mode=eval", workdir]
  bigger, other_vae = "--config.dit.num_layers=6", f"--config.init.vae_weights={swapped}"
  started = {
    (name, change): command(*args, override)
    for name, args in (("predict", predict), ("generate", generate), ("eval", evaluate))
    for change, override in (("dit", bigger), ("vae", other_vae))
  }
  for (name, change), process in started.items():
    result = finish(process)
    assert result.returncode != 0, (name, change)
    assert run_dir in result.stderr, (name, change, result.stderr[-2000:])
    if change == "dit":
      assert "dit.num_layers is 4 in the run, 6 here" in result.stderr, result.stderr[-2000:]
    else:
      assert "its frozen VAE is weights" in result.stderr and swapped in result.stderr
  assert not out.exists()


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_a_run_made_before_run_json_opens_from_its_checkpoint(demo, tmp_path):
  """Without run.json (a run made before it) the config comes from the checkpoint, the VAE is
  used unverified with a warning, and the model gives the same masks."""
  old = str(tmp_path / "old_run")
  shutil.copytree(os.path.join(demo, "genmask"), old)
  os.remove(os.path.join(old, run.RUN_FILE))
  store = ["--records", f"{demo}/data/heldout", "--features", f"{demo}/features/heldout"]
  ids = [f"--sample_id={i}" for i in records.RecordReader(f"{demo}/data/heldout").ids()[:4]]
  new_out, old_out = tmp_path / "new", tmp_path / "old"
  new = command("launch.predict", f"--workdir={demo}/genmask", *store, *ids, f"--out={new_out}")
  legacy = command("launch.predict", f"--workdir={old}", *store, *ids, f"--out={old_out}")
  succeeded(new)
  result = finish(legacy)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "made before runs recorded their VAE" in result.stderr
  for name in sorted(os.listdir(new_out)):
    np.testing.assert_array_equal(read_mask(new_out / name), read_mask(old_out / name))
