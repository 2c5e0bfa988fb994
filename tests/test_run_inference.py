"""A trained run as one object (genmask_jax/inference/genmask.py), after the shortened demo.

predict, generate and --mode=eval need only --workdir and give the evaluation's own results;
masks of wide and tall images cover what was drawn; one mask recomputed here from the DiT, the
VAE and the run's latent statistics, none of the façade's code, equals predict's; a swapped VAE,
a change to the model's size and a run without run.json are refused by name.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from user_scenes import read_mask, shape_coverage, user_scene

from genmask_jax import GenMask
from genmask_jax.conversion import weights
from genmask_jax.data import records, synthetic
from genmask_jax.data.features import FeatureError, FeatureReader
from genmask_jax.evaluation import metrics
from genmask_jax.models.dit import WanDiT
from genmask_jax.models.genmask import Models
from genmask_jax.models.vae import WanVAE
from genmask_jax.runs import record
from genmask_jax.runtime import sharding
from genmask_jax.training.vae_training import unnormalized

# The shortened demo fits its 64 training scenes and generalizes little: its first training
# scene, redrawn at 128 x 128 and 96 x 96, is found (measured over seeds 0-2, scenes 0-5: 79-99%
# of the target covered, none of the others).
TARGET_COVERED = 0.5
OTHERS_COVERED = 0.1
DEMO_ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
# Training scenes with no shape in the grid's bottom row (WIDE) or right column (TALL): cut there
# they become wide or tall images whose shapes sit where training saw them, at training scale
# once predict resizes them back, the cut band replaced by predict's black padding.
WIDE, TALL = (25, 39, 22, 17), (7, 22, 28, 31)
# The mean share of each target its mask covers, and the most of any other shape (the shortened
# demo, seed 0, on an AMD EPYC: wide 0.97, tall 0.87, others at most 0.03). A predict that swaps
# the resized height and width still writes masks of the right size, covering 0.33 and 0.28.
NON_SQUARE_TARGET = 0.7
NON_SQUARE_OTHERS = 0.2


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


def evaluated_ious(demo: str) -> dict[str, float]:
  with open(os.path.join(demo, "eval", "heldout_per_sample.json")) as f:
    return {row["id"]: row["iou"] for row in json.load(f)}


def iou(predicted: np.ndarray, sample: records.Sample) -> float:
  intersection, union = metrics.intersection_union(predicted, records.decode_mask(sample))
  return float(metrics.sample_iou(intersection, union))


def cut_scene(index: int, rows: int, cols: int, height: int, width: int):
  """Training scene `index` cut to its top-left (rows, cols) pixels, redrawn at (height, width)
  (nearest neighbour): the image, its target's mask and the expression."""
  sample = synthetic.segmentation_sample("train", index)
  y = np.arange(height) * rows // height
  x = np.arange(width) * cols // width
  image = records.decode_image(sample)[y][:, x]
  target = records.decode_mask(sample)[y][:, x] > 0
  return image, target, sample["text"]


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_predict_with_the_workdir_alone_reproduces_the_evaluation(demo, tmp_path):
  """Held-out scenes written as PNG files and segmented by launch.predict with --workdir,
  --vlm, --image and --text only: the same per-sample IoU as the demo's evaluation; user images
  of other sizes get masks at their own size, on the target shape; wide and tall images (cut
  from training scenes) too."""
  run_dir, vlm = os.path.join(demo, "genmask"), os.path.join(demo, "tiny_qwen")
  reader = records.RecordReader(os.path.join(demo, "data", "heldout"))
  images, texts = [], []
  for i in range(len(reader)):
    path = str(tmp_path / f"heldout_{i:03d}.png")
    Image.fromarray(records.decode_image(reader[i])).save(path)
    images.append(f"--image={path}")
    texts.append(f"--text={reader[i]['text']}")
  user = {"large": user_scene(0, 128, 128), "odd": user_scene(0, 96, 96)}
  user |= {f"wide_{k}": cut_scene(k, 43, 64, 100, 150) for k in WIDE}
  user |= {f"tall_{k}": cut_scene(k, 64, 43, 150, 100) for k in TALL}
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

  evaluated = evaluated_ious(demo)
  assert len(evaluated) == len(reader)
  ious = [
    iou(read_mask(os.path.join(out, f"{i:03d}_heldout_{i:03d}_mask.png")), reader[i])
    for i in range(len(reader))
  ]
  expected = [evaluated[reader[i]["id"]] for i in range(len(reader))]
  print("held-out IoU, predict vs evaluation:", np.mean(ious), np.mean(expected))
  np.testing.assert_allclose(ious, expected, atol=1e-6)

  covered = {}
  for k, (name, (image, target, _)) in enumerate(user.items(), start=len(reader)):
    predicted = read_mask(os.path.join(out, f"{k:03d}_{name}_mask.png"))
    assert predicted.shape == image.shape[:2]
    covered[name] = shape_coverage(image, predicted, target)
    print(f"{name} {image.shape[:2]}: covers the target {covered[name][0]:.2f}, the others "
          f"{covered[name][1:]}")  # fmt: skip
  for name in ("large", "odd"):
    assert covered[name][0] > TARGET_COVERED and max(covered[name][1:]) < OTHERS_COVERED, name
  for kind in ("wide", "tall"):
    scenes = [c for name, c in covered.items() if name.startswith(kind)]
    assert np.mean([c[0] for c in scenes]) >= NON_SQUARE_TARGET, (kind, scenes)
    assert max(max(c[1:]) for c in scenes) <= NON_SQUARE_OTHERS, (kind, scenes)


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_one_mask_recomputed_from_the_dit_equals_predicts(demo):
  """A held-out scene's mask computed here from the checkpoint's parameters, the VAE without its
  latent normalization and the run's latent statistics applied by hand, the DiT called once at
  t = 1: the façade's mask (predict's), pixel for pixel but for float rounding at the threshold."""
  run_dir = os.path.join(demo, "genmask")
  config = record.config_from_dict(record.read_record(run_dir)["config"])
  features = os.path.join(demo, "features", "heldout")
  sample = records.RecordReader(os.path.join(demo, "data", "heldout"))[1]
  (mask,) = GenMask.open(run_dir, devices=jax.devices()[:1]).segment_samples(
    [sample], features=features
  )

  # The image as the model reads it (64 x 64 already: no resize, no padding), in [-1, 1].
  image = records.decode_image(sample)
  assert image.shape[:2] == (config.data.segmentation.resolution,) * 2
  pixels = jnp.asarray(image[None].astype(np.float32) / 127.5 - 1)
  hidden = FeatureReader(features).get(sample["id"])
  text = np.zeros((1, config.data.text_len, hidden.shape[1]), np.float32)
  text[0, : len(hidden)] = hidden
  text_mask = np.arange(config.data.text_len)[None] < len(hidden)
  # The checkpoint's DiT and the frozen VAE, read with Orbax alone.
  steps = [int(s) for s in os.listdir(os.path.join(run_dir, "checkpoints")) if s.isdigit()]
  state = os.path.join(run_dir, "checkpoints", str(max(steps)), "state")
  dit_params = ocp.PyTreeCheckpointer().restore(state)["params"]["dit"]
  vae_params = ocp.StandardCheckpointer().restore(os.path.join(config.init.vae_weights, "vae"))
  # The VAE's raw latents; the run's statistics applied by hand on the way in and out.
  vae = unnormalized(WanVAE(**config.vae.to_dict()))
  mean = jnp.asarray(config.vae.latents_mean, jnp.float32)
  std = jnp.asarray(config.vae.latents_std, jnp.float32)
  cond = (vae.apply({"params": vae_params}, pixels, method=WanVAE.encode) - mean) / std
  # One DiT forward at t = 1 from the seeded noise (the mask latent's prior mean is 0).
  t, cond = config.segment.t, cond[:, None]
  x_t = t * jax.random.normal(jax.random.key(config.segment.seed), cond.shape, jnp.float32)
  v = WanDiT(**config.dit.to_dict()).apply(
    {"params": dit_params}, x_t, jnp.full((1,), 1000 * t), text, text_mask, cond
  )
  x0 = (x_t - t * v.astype(jnp.float32))[:, 0]
  decoded = vae.apply({"params": vae_params}, x0 * std + mean, False, method=WanVAE.decode)
  expected = 5.0 * np.asarray(decoded)[0].mean(-1) > 0  # The mask-logit rule: data/masks.py.

  assert mask.shape == expected.shape and 0.05 < expected.mean() < 0.95
  # Measured: no pixel differs; skipping the statistics on the way in changes 39 of 4096.
  assert np.sum(mask != expected) <= 4, np.sum(mask != expected)
  assert iou(mask, sample) == pytest.approx(evaluated_ious(demo)[sample["id"]], abs=1e-6)


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_a_changed_model_or_a_swapped_vae_is_refused(demo, tmp_path):
  """predict, generate and --mode=eval refuse another DiT size and another VAE, naming the
  field (or the VAE) and the run; nothing is written."""
  run_dir = os.path.join(demo, "genmask")
  run_record = record.read_record(run_dir)
  swapped = str(tmp_path / "other_vae")  # A VAE of the same architecture, other weights.
  models = Models.from_config(record.config_from_dict(run_record["config"]))
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
def test_a_run_without_run_json_is_refused_with_the_command_that_writes_it(demo, tmp_path):
  """Checkpoints without run.json: the run's config, VAE and VLM settings are unknown, so it
  is refused, naming the training command that writes run.json on resuming."""
  old = str(tmp_path / "old_run")
  shutil.copytree(os.path.join(demo, "genmask"), old)
  os.remove(os.path.join(old, record.RUN_FILE))
  rewrite = rf"python -m genmask_jax\.main --config=<its training config> --workdir={old}"
  with pytest.raises(record.RunError, match=rf"run {old}: checkpoints but no run\.json.*{rewrite}"):
    GenMask.open(old)


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_a_text_longer_than_the_model_reads_is_refused_before_the_weights_load(demo):
  """The run's DiT reads data.text_len tokens (40 in the demo): a longer query is refused naming
  the sample, the limit and what to do, not truncated; the weights are not loaded for it."""
  model = GenMask.open(os.path.join(demo, "genmask"), vlm=os.path.join(demo, "tiny_qwen"))
  image = np.zeros((32, 48, 3), np.uint8)
  text = " ".join(["the small blue square below the large red circle"] * 8)
  message = r"'image-0': \d+ text tokens exceed text_len=40.*at most 40 tokens.*shorten the text"
  with pytest.raises(FeatureError, match=message):
    model.segment([image], [text])
  assert model._loaded is None
