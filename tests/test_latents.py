"""The latent store: written by workers, read by index, joined by the pipeline, and training on
stored latents equals training that encodes in every step."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from train_config import get_config
from training_data import IMAGE_SIZE, make_stores

from genmask_jax.data import encode_latents, pipeline, preprocess, records, synthetic
from genmask_jax.data.latents import LatentError, LatentReader
from genmask_jax.models.vae import LATENTS_STD
from genmask_jax.training import precompute_latents, train

ENV = dict(os.environ, PYTHONPATH=".:tests", JAX_PLATFORMS="cpu")


def pooled(images: np.ndarray) -> np.ndarray:
  """A stand-in encoder: 4x4 average pooling, the 3 channels tiled to 16 (plus a ramp)."""
  b, r = images.shape[:2]
  pooled = images.reshape(b, r // 4, 4, r // 4, 4, 3).mean((2, 4))
  return np.concatenate([pooled] * 5 + [pooled[..., :1] * 2], -1)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("stores"))
  make_stores(root)
  return root


@pytest.mark.parametrize("task", ["segmentation", "generation"])
def test_two_workers_write_a_store_read_by_index(root, tmp_path, task):
  store, out = os.path.join(root, task), str(tmp_path / "latents")
  calls = []

  def encode(images):
    calls.append(len(images))
    return pooled(images)

  kwargs = dict(vae="vae-a", resolution=IMAGE_SIZE, num_workers=2, batch_size=5)
  assert not encode_latents.encode_store(encode, store, out, worker_index=1, **kwargs)
  with pytest.raises(LatentError, match=r"workers \[0\] of 2"):
    LatentReader(out)
  assert encode_latents.encode_store(encode, store, out, worker_index=0, **kwargs)
  assert set(calls) == {5}  # Every call one shape (the last batch padded).

  samples, reader = records.RecordReader(store), LatentReader(out)
  assert reader.ids() == samples.ids()
  for i in range(len(samples)):
    pixels = preprocess.pixels(samples[i], IMAGE_SIZE)
    got = reader[i]
    np.testing.assert_allclose(got["image_latents"], pooled(pixels["image"][None])[0], atol=1e-6)
    if task == "segmentation":
      expected = pooled(np.where(pixels["mask"][None, ..., None] == 1, 1.0, -1.0) * np.ones(3))
      np.testing.assert_allclose(got["mask_latents"], expected[0], atol=1e-6)
    else:
      assert set(got) == {"image_latents"}

  calls.clear()  # A re-run skips the written slices.
  assert encode_latents.encode_store(encode, store, out, worker_index=0, **kwargs)
  assert calls == []
  with pytest.raises(LatentError, match="was started with"):
    encode_latents.encode_store(encode, store, out, **dict(kwargs, vae="vae-b"))


def test_pipeline_joins_latents_and_refuses_those_of_other_samples(root, tmp_path):
  seg_latents, gen_latents = str(tmp_path / "seg"), str(tmp_path / "gen")
  for task, out in (("segmentation", seg_latents), ("generation", gen_latents)):
    encode_latents.encode_store(
      pooled, os.path.join(root, task), out, vae="v", resolution=IMAGE_SIZE
    )
  other_store, other_latents = str(tmp_path / "other"), str(tmp_path / "other_latents")
  with records.RecordWriter(other_store, 16) as writer:  # Same task and size, other samples.
    for sample in synthetic.samples("val", 32, image_size=IMAGE_SIZE):
      writer.write(sample)
  encode_latents.encode_store(pooled, other_store, other_latents, vae="v", resolution=IMAGE_SIZE)
  config = get_config(root)
  source = config.data.segmentation.sources[0]

  def join(latents_dir, resolution=IMAGE_SIZE):
    return pipeline.JoinedSource(
      source["records"],
      source["features"],
      task="segmentation",
      model_id=config.data.encoder_model_id,
      template=config.data.prompt_template,
      latents_dir=latents_dir,
      resolution=resolution,
    )

  example = preprocess.example(
    join(seg_latents)[3], resolution=IMAGE_SIZE, text_len=8, text_dtype="float32"
  )
  np.testing.assert_array_equal(
    example["mask_latents"], LatentReader(seg_latents)[3]["mask_latents"]
  )
  with pytest.raises(LatentError, match="holds generation latents at resolution 32"):
    join(gen_latents)
  with pytest.raises(LatentError, match="expected segmentation at 64"):
    join(seg_latents, resolution=64)
  with pytest.raises(LatentError, match="its ids are not those of"):
    join(other_latents)


def latent_config(root, latents_root, **overrides):
  """The trainer tests' config with latent stores of its own under `latents_root`."""
  config = get_config(f"{root},latents")
  for task in ("segmentation", "generation"):
    config.data[task].sources[0]["latents"] = os.path.join(latents_root, task)
  config.update(overrides)
  return config


def metric_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "loss" in r]


def test_training_on_stored_latents_matches_encoding_in_the_step(root, tmp_path):
  config = latent_config(root, tmp_path / "latents", total_steps=3)
  precompute_latents.precompute(config, batch_size=8)
  plain = get_config(root)
  plain.total_steps = 3
  train.train(config, str(tmp_path / "stored"))
  train.train(plain, str(tmp_path / "encoded"))

  stored, encoded = metric_rows(tmp_path / "stored"), metric_rows(tmp_path / "encoded")
  assert [r["step"] for r in stored] == [1, 2, 3]
  for a, b in zip(stored, encoded, strict=True):
    for key in ("loss/segmentation", "loss/generation", "grad_norm"):
      assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)


def test_latents_of_another_vae_are_refused(root, tmp_path):
  precompute_latents.precompute(latent_config(root, tmp_path / "latents"), batch_size=16)
  # The random VAE is seeded from config.seed; its latent statistics are part of the VAE too.
  other_weights = latent_config(root, tmp_path / "latents", seed=7)
  other_stats = latent_config(root, tmp_path / "latents")
  other_stats.vae.latents_std = tuple(2 * s for s in LATENTS_STD)
  for config in (other_weights, other_stats):
    with pytest.raises(LatentError, match="another VAE"):
      train.train(config, str(tmp_path / "run"))


def test_precompute_command_writes_every_named_store(root, tmp_path):
  config = f"tests/train_config.py:{root},latents"
  command = [sys.executable, "-m", "launch.precompute_latents", f"--config={config}"]
  for worker in (0, 1):
    args = ["--num_workers=2", f"--worker_index={worker}", "--dtype=float16"]
    result = subprocess.run(command + args, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
  for task in ("segmentation", "generation"):
    reader = LatentReader(os.path.join(root, f"{task}_latents"))
    assert reader.meta.dtype == "float16" and reader.layout.num_workers == 2
    assert reader.ids() == records.RecordReader(os.path.join(root, task)).ids()
    assert reader[31]["image_latents"].shape == (IMAGE_SIZE // 8, IMAGE_SIZE // 8, 16)


def test_precompute_command_fans_out_over_cpu_workers(tmp_path):
  """--gpus=cpu:2 (launch/common/fanout.py): one command, two workers, the store complete."""
  root = str(tmp_path / "stores")
  make_stores(root, num_samples=8)
  command = [sys.executable, "-m", "launch.precompute_latents"]
  command += [f"--config=tests/train_config.py:{root},latents", "--gpus=cpu:2"]
  command += [f"--worker_logs={tmp_path / 'logs'}", "--batch_size=4"]
  result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "precompute_latents: 100%" in result.stderr
  assert len(os.listdir(tmp_path / "logs")) == 2
  for task in ("segmentation", "generation"):
    reader = LatentReader(os.path.join(root, f"{task}_latents"))
    assert reader.layout.num_workers == 2
    assert reader.ids() == records.RecordReader(os.path.join(root, task)).ids()
