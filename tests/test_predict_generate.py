"""launch/predict.py and launch/generate.py end to end, as subprocesses, on a tiny trained model.

The set-up is the user's workflow in miniature: the trainer tests' synthetic sample stores are
encoded by a tiny random Qwen2.5-VL (launch/precompute_vlm.py), a tiny GenMask whose text_dim
is the VLM's width trains 2 steps on them (the training CLI), and the tools run on its
checkpoint with texts encoded in-process (--vlm) or read from the feature stores (--features).
Every process uses one CPU device and a shared JAX compilation cache, so the frozen VAE's
initialization, the segmenter and the generator compile once; independent runs go in parallel.
"""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image
from train_config import get_config
from training_data import IMAGE_SIZE, make_stores

from genmask_jax.data import pipeline, records, resize
from genmask_jax.data.features import FeatureMeta, FeatureWriter, StoreLayout
from genmask_jax.models.genmask import Models
from genmask_jax.runs import model
from genmask_jax.runtime import sharding
from genmask_jax.vlm import encode, image_policy, prompts, tiny_qwen

POLICY = image_policy.DEFAULT.to_record()  # Every feature store records one.

VLM_ID = "tiny_qwen"  # The VLM directory's name: the encoder id the tools derive from it.
VLM_WIDTH = 64
TEXT_LEN = 80  # The longest synthetic caption is 66 tiny-VLM tokens.
# tests/train_config.py with these overrides is the config of the model trained here.
MODEL_OVERRIDES = (
  f"--config.dit.text_dim={VLM_WIDTH}",
  f"--config.data.encoder_model_id={VLM_ID}",
  f"--config.data.text_len={TEXT_LEN}",
)
CAPTIONS = ("A photo of a red cat.", "A photo of a blue bus.", "A photo of a dog.")


def encode_store(model, processor, store: str, out: str, reasoning: bool = False) -> None:
  samples = records.RecordReader(store)
  meta = FeatureMeta(VLM_ID, prompts.prompt_template(reasoning), "float16", VLM_WIDTH, POLICY)
  writer = FeatureWriter(out, meta, StoreLayout(len(samples), 1, len(samples)), 0)
  assert encode.precompute(model, processor, samples, writer, batch_size=16, reasoning=reasoning)


class Runner:
  """Starts commands in subprocesses that share one JAX compilation cache."""

  def __init__(self, tmp):
    self.env = dict(
      os.environ,
      PYTHONPATH=".:tests",
      JAX_PLATFORMS="cpu",
      HF_HUB_OFFLINE="1",
      XLA_FLAGS="--xla_force_host_platform_device_count=1",
      JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      # The random VAE's initialization compiles ~3x faster than with threefry keys.
      JAX_DEFAULT_PRNG_IMPL="rbg",
    )

    self.started: list[subprocess.Popen] = []

  def start(self, module: str, *args: str) -> subprocess.Popen:
    process = subprocess.Popen(
      [sys.executable, "-m", module, *args],
      env=self.env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    self.started.append(process)
    return process

  def kill(self) -> None:
    """Stops what is still running (a failed set-up leaves the other runs going)."""
    for process in self.started:
      if process.poll() is None:
        process.kill()
      process.wait()


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
  stdout, stderr = process.communicate(timeout=600)
  return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def succeeded(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


# One worker runs this module, so that its fixture (every tool's run, ~2 minutes) is built once.
pytestmark = pytest.mark.xdist_group("predict_generate")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every run of the tools, by name, with the stores and output paths they used."""
  tmp = tmp_path_factory.mktemp("predict_generate")
  root, workdir = str(tmp / "stores"), str(tmp / "workdir")
  vlm_dir = tiny_qwen.save_tiny_qwen(str(tmp / VLM_ID))
  model, processor = encode.load_vlm(vlm_dir)
  # The config file's stores, their features replaced by the tiny VLM's (make_stores then
  # keeps them: it only writes stores whose features are missing).
  stores = make_stores(root)
  for store in stores.values():
    shutil.rmtree(store["features"])
    encode_store(model, processor, store["records"], store["features"])
  # ReasonSeg's two stages, as launch/precompute_vlm.py --reasoning stores them.
  segmentation = stores["segmentation"]
  segmentation["reasoning_features"] = str(tmp / "reasoning_features")
  encode_store(model, processor, segmentation["records"], segmentation["reasoning_features"], True)
  runner = Runner(tmp)
  try:
    yield _run_tools(runner, tmp, root, workdir, vlm_dir, stores)
  finally:
    runner.kill()


def _run_tools(runner, tmp, root, workdir, vlm_dir, stores) -> dict:
  config = [f"--config=tests/train_config.py:{root}", *MODEL_OVERRIDES, f"--workdir={workdir}"]
  train = ["--config.total_steps=2"]
  succeeded(finish(runner.start("genmask_jax.main", *config, *train)))

  rng = np.random.default_rng(0)
  images = {"wide.png": (40, 64), "tall.jpg": (72, 48)}
  for name, hw in images.items():
    Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(tmp / name)
  segmentation, generation = stores["segmentation"], stores["generation"]
  seg_ids = records.RecordReader(segmentation["records"]).ids()[:2]
  gen_ids = records.RecordReader(generation["records"]).ids()[:2]
  seg_store = [f"--records={segmentation['records']}", f"--features={segmentation['features']}"]
  gen_store = [f"--records={generation['records']}", f"--features={generation['features']}"]
  out = {name: tmp / name for name in ("vlm", "features", "refused", "reasoning", "usage")}
  out.update({f"reasoning_{kind}": tmp / f"reasoning_{kind}" for kind in ("vlm", "features")})
  # Batches of 2: the 3-query runs pad their second batch; every run reuses one compilation.
  predict = ["launch.predict", *config, "--batch_size=2"]
  generate = ["launch.generate", *config, "--batch_size=2", "--steps=2", "--columns=2"]
  cold = {
    "predict_vlm": runner.start(
      *predict,
      f"--vlm={vlm_dir}",
      *(f"--image={tmp / name}" for name in images),
      "--text=red cat on the left",
      "--text=blue car",
      f"--records={segmentation['records']}",
      f"--sample_id={seg_ids[0]}",
      f"--out={out['vlm']}",
    ),
    "generate_vlm": runner.start(
      *generate, f"--vlm={vlm_dir}", *(f"--prompt={c}" for c in CAPTIONS), f"--out={tmp}/a.png"
    ),
  }
  results = {name: finish(p) for name, p in cold.items()}
  gen_args = [*gen_store, *(f"--sample_id={i}" for i in gen_ids), "--guidance=3"]
  warm = {
    "predict_features": runner.start(
      *predict, *seg_store, *(f"--sample_id={i}" for i in seg_ids), f"--out={out['features']}"
    ),
    "predict_other_encoder": runner.start(
      *predict,
      *seg_store,
      f"--sample_id={seg_ids[0]}",
      "--config.data.encoder_model_id=other",
      f"--out={out['refused']}",
    ),
    "generate_features": runner.start(*generate, *gen_args, f"--out={tmp}/b.png"),
    "generate_features_again": runner.start(*generate, *gen_args, f"--out={tmp}/c.png"),
    "generate_features_seed1": runner.start(*generate, *gen_args, "--seed=1", f"--out={tmp}/d.png"),
    "predict_reasoning_vlm": runner.start(
      *predict,
      f"--vlm={vlm_dir}",
      "--reasoning",
      f"--records={segmentation['records']}",
      f"--sample_id={seg_ids[0]}",
      f"--out={out['reasoning_vlm']}",
    ),
    "predict_reasoning_features": runner.start(
      *predict,
      f"--records={segmentation['records']}",
      f"--features={segmentation['reasoning_features']}",
      "--reasoning",
      f"--sample_id={seg_ids[0]}",
      f"--out={out['reasoning_features']}",
    ),
    "predict_reasoning_store_without_flag": runner.start(
      *predict,
      f"--records={segmentation['records']}",
      f"--features={segmentation['reasoning_features']}",
      f"--sample_id={seg_ids[0]}",
      f"--out={out['reasoning']}",
    ),
  }
  image = str(tmp / "wide.png")
  usage = {  # name: (command, the error it must print)
    "no_query": (["launch.predict", *seg_store], "nothing to do: give queries"),
    "texts_per_image": (
      [
        "launch.predict",
        f"--vlm={vlm_dir}",
        f"--image={image}",
        f"--image={image}",
        "--text=a",
        "--text=b",
        "--text=c",
      ],  # fmt: skip
      "give one --text per --image, or one for all: got 2 images, 3 texts",
    ),
    "vlm_and_features": (
      ["launch.predict", f"--vlm={vlm_dir}", *seg_store, f"--sample_id={seg_ids[0]}"],
      "give exactly one of --vlm (encode in-process) and --features",
    ),
    "sample_without_records": (
      ["launch.predict", f"--features={segmentation['features']}", f"--sample_id={seg_ids[0]}"],
      "--sample_id needs --records",
    ),
    "features_for_an_image": (
      ["launch.predict", *seg_store, f"--sample_id={seg_ids[0]}", f"--image={image}", "--text=a"],
      "--features holds store samples only",
    ),
    "generate_no_query": (["launch.generate", *gen_store], "nothing to do: give queries"),
  }
  for name, (command, _) in usage.items():
    warm[f"usage_{name}"] = runner.start(*command, *config, f"--out={out['usage']}/{name}")
  results.update({name: finish(p) for name, p in warm.items()})
  return dict(
    results=results,
    out=out,
    tmp=tmp,
    seg_ids=seg_ids,
    features=seg_store[1],
    root=root,
    workdir=workdir,
    segmentation=segmentation,
    prng_impl=runner.env["JAX_DEFAULT_PRNG_IMPL"],
    usage={name: message for name, (_, message) in usage.items()},
  )


def reference_masks(runs) -> dict[str, np.ndarray]:
  """The masks of the store's first two samples computed here, not by launch/predict.py: the
  evaluation's input pipeline, the checkpoint restored and segmented through
  genmask_jax/runs/model.py, logits cropped and resized back to the image's size, thresholded
  at 0."""
  config = get_config(runs["root"])
  config.dit.text_dim, config.data.text_len = VLM_WIDTH, TEXT_LEN
  config.data.encoder_model_id = VLM_ID
  mesh, rules = sharding.make_mesh(config.mesh, jax.devices()[:1]), sharding.rules()
  models = Models.from_config(config)
  store = runs["segmentation"]
  dataset = pipeline.eval_dataset(
    config.data,
    store["records"],
    store["features"],
    batch_size=2,
    template=prompts.prompt_template(),
  )
  batch = next(iter(dataset))
  # The tools' key implementation (Runner's JAX_DEFAULT_PRNG_IMPL): it draws the frozen VAE's
  # random initialization and the segmentation noise.
  prng = jax.default_prng_impl(runs["prng_impl"])
  with prng, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params, _ = model.restore_params(config, runs["workdir"], models, mesh, rules)
    vae_params = model.frozen_vae_params(models, config, mesh, rules)
    inputs = sharding.global_batch({k: batch[k] for k in ("image", "text", "text_mask")}, mesh)
    logits = model.segmenter(models, config)(
      params, vae_params, inputs["image"], inputs["text"], inputs["text_mask"]
    )
  logits = np.asarray(logits)
  ids = records.RecordReader(store["records"]).ids()
  return {
    ids[int(batch["index"][k])]: resize.undo_resize(
      logits[k], batch["size"][k], batch["resized_size"][k]
    )
    > 0
    for k in range(2)
  }


def read_png(path) -> tuple[str, np.ndarray]:
  with Image.open(path) as image:
    assert image.format == "PNG"
    return image.mode, np.asarray(image)


def prediction(out, index: int, name: str, hw: tuple[int, int]) -> np.ndarray:
  """The mask of query `index`: 0 / 255 at the image's own size, with an RGB overlay."""
  mode, mask = read_png(out / f"{index:03d}_{name}_mask.png")
  assert mode == "L" and mask.shape == hw
  assert set(np.unique(mask)) <= {0, 255}
  mode, overlay = read_png(out / f"{index:03d}_{name}_overlay.png")
  assert mode == "RGB" and overlay.shape == (*hw, 3)
  return mask


def stem(sample_id: str) -> str:
  return sample_id.rsplit("/", 1)[-1]


def test_predict_with_vlm_writes_masks_at_the_original_sizes(runs):
  stdout = succeeded(runs["results"]["predict_vlm"])
  out = runs["out"]["vlm"]
  prediction(out, 0, "wide", (40, 64))
  prediction(out, 1, "tall", (72, 48))
  prediction(out, 2, stem(runs["seg_ids"][0]), (IMAGE_SIZE, IMAGE_SIZE))
  assert len(os.listdir(out)) == 6
  assert str(out / "001_tall_mask.png") in stdout and "'blue car'" in stdout


def test_predict_with_features_equals_the_segmenter_run_directly(runs):
  succeeded(runs["results"]["predict_features"])
  expected = reference_masks(runs)
  for k, sample_id in enumerate(runs["seg_ids"]):
    mask = prediction(runs["out"]["features"], k, stem(sample_id), (IMAGE_SIZE, IMAGE_SIZE))
    # Measured: 68% and 70% foreground; two empty (or full) masks would not test the model.
    assert 0.05 < expected[sample_id].mean() < 0.95
    np.testing.assert_array_equal(mask > 0, expected[sample_id], err_msg=sample_id)


def test_predict_with_features_agrees_with_the_vlm(runs):
  succeeded(runs["results"]["predict_features"])
  first = stem(runs["seg_ids"][0])
  mask = prediction(runs["out"]["features"], 0, first, (IMAGE_SIZE, IMAGE_SIZE))
  # The same sample with its text encoded in-process: features differ by fp16 storage only.
  from_vlm = prediction(runs["out"]["vlm"], 2, first, (IMAGE_SIZE, IMAGE_SIZE))
  assert np.mean(mask == from_vlm) > 0.98


def test_features_of_another_encoder_are_refused(runs):
  result = runs["results"]["predict_other_encoder"]
  assert result.returncode != 0
  assert runs["features"].removeprefix("--features=") in result.stderr
  assert "expected 'other'" in result.stderr
  assert not runs["out"]["refused"].exists()


def test_generate_grid_size(runs):
  stdout = succeeded(runs["results"]["generate_vlm"])
  path = runs["tmp"] / "a.png"
  assert str(path) in stdout and all(repr(c) in stdout for c in CAPTIONS)
  mode, image = read_png(path)
  assert mode == "RGB" and image.shape == (2 * IMAGE_SIZE, 2 * IMAGE_SIZE, 3)
  tiles = image.reshape(2, IMAGE_SIZE, 2, IMAGE_SIZE, 3).transpose(0, 2, 1, 3, 4)
  assert not np.array_equal(tiles[0, 0], tiles[0, 1])  # Other captions, other noise.
  assert not tiles[1, 1].any()  # Three images: the fourth cell stays black.


def test_generate_from_features_deterministic_and_varied(runs):
  grids = {}
  for run, name in [("", "b"), ("_again", "c"), ("_seed1", "d")]:
    succeeded(runs["results"][f"generate_features{run}"])
    mode, grids[name] = read_png(runs["tmp"] / f"{name}.png")
    assert mode == "RGB" and grids[name].shape == (IMAGE_SIZE, 2 * IMAGE_SIZE, 3)
  np.testing.assert_array_equal(grids["b"], grids["c"])  # Deterministic.
  # Not constant, and other texts or another seed give other images. Measured on 0..255 pixels:
  # tile std 72-81, mean |difference| 79-91 between the two tiles of a grid and 80 between
  # seeds 0 and 1 (a blank, a constant or a text-blind output would be near 0).
  for name in "bd":
    tiles = grids[name].reshape(IMAGE_SIZE, 2, IMAGE_SIZE, 3).transpose(1, 0, 2, 3).astype(float)
    assert min(t.std() for t in tiles) > 20, name
    assert np.abs(tiles[0] - tiles[1]).mean() > 20, name
  assert np.abs(grids["b"].astype(float) - grids["d"]).mean() > 20


def test_predict_with_vlm_in_reasoning_mode_agrees_with_the_reasoning_feature_store(runs):
  """--vlm --reasoning rewrites the text in-process; --features holds launch/precompute_vlm.py's
  rewrites: the same two stages, so the same mask up to the store's fp16 rounding."""
  name = stem(runs["seg_ids"][0])
  for kind in ("vlm", "features"):
    stdout = succeeded(runs["results"][f"predict_reasoning_{kind}"])
    assert str(runs["out"][f"reasoning_{kind}"] / f"000_{name}_mask.png") in stdout
  from_vlm = prediction(runs["out"]["reasoning_vlm"], 0, name, (IMAGE_SIZE, IMAGE_SIZE))
  stored = prediction(runs["out"]["reasoning_features"], 0, name, (IMAGE_SIZE, IMAGE_SIZE))
  assert 0.05 < np.mean(stored > 0) < 0.95
  assert np.mean(from_vlm == stored) > 0.98


def test_a_reasoning_feature_store_needs_reasoning_mode(runs):
  result = runs["results"]["predict_reasoning_store_without_flag"]
  assert result.returncode != 0 and "prompt template" in result.stderr
  assert not runs["out"]["reasoning"].exists()


@pytest.mark.parametrize(
  "name",
  [
    "no_query",
    "texts_per_image",
    "vlm_and_features",
    "sample_without_records",
    "features_for_an_image",
    "generate_no_query",
  ],
)
def test_usage_errors(runs, name):
  result = runs["results"][f"usage_{name}"]
  assert result.returncode != 0
  assert runs["usage"][name] in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not (runs["out"]["usage"] / name).exists()
