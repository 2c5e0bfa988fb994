"""Start-up config checks (genmask_jax/config_check.py): each names the fields that disagree."""

import re
import subprocess
import sys

import pytest
from train_config import get_config

from genmask_jax.config_check import ConfigError, image_multiple, validate

# conftest.py gives 8 fake CPU devices: the trainer config's mesh has 8 batch shards.


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
  return str(tmp_path_factory.mktemp("stores"))


@pytest.fixture
def config(stores):
  config = get_config(stores).copy_and_resolve_references()
  config.mesh = dict(data=1, fsdp=-1, tensor=1)
  return config


def refused(config, mode: str, message: str) -> None:
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate(config, mode)


def test_a_consistent_config_passes_in_every_mode(config):
  for mode in ("model", "train", "eval"):
    validate(config, mode)


def test_feature_width_against_the_dit_text_dim(config):
  config.dit.text_dim = 64  # The stores hold 32-wide features.
  features = config.data.segmentation.sources[0]["features"]
  refused(
    config,
    "train",
    f"config: data.segmentation.sources[0].features {features} holds text features of width "
    "32, dit.text_dim is 64: set --config.dit.text_dim=32",
  )
  refused(config, "eval", f"config: eval.splits[0].features {config.eval.splits[0]['features']}")
  validate(config, "model")  # Inference checks its own stores when it opens them.


def test_empty_eval_splits(config):
  config.eval.splits = []
  refused(config, "eval", "config: eval.splits is empty, so --mode=eval has nothing to evaluate")
  validate(config, "train")
  config.eval.every_steps = 100
  refused(config, "train", "config: eval.splits is empty, so eval.every_steps=100 has nothing")


def test_resolution_against_the_vae_stride_and_the_dit_patch(config):
  config.vae.dim_mult = (1, 2, 4)  # The demo's VAE: stride 4, x patch 2.
  assert image_multiple(config) == 8
  config.data.generation.resolution = 40  # Not a multiple of 16, fine for this VAE.
  validate(config, "model")
  config.data.segmentation.resolution = 36
  refused(
    config,
    "model",
    "config: data.segmentation.resolution is 36, not a multiple of 8 (the VAE's stride 4 from "
    "vae.dim_mult (1, 2, 4) x dit.patch_size (2, 2))",
  )


def test_latent_channels_of_the_dit_and_the_vae(config):
  config.dit.in_dim = 4
  refused(config, "model", "config: dit.in_dim is 4, vae.z_dim is 16")
  config.dit.in_dim, config.dit.out_dim = 16, 8
  refused(config, "model", "config: dit.out_dim is 8, vae.z_dim is 16")


def test_temporal_patch(config):
  config.dit.patch_size = (2, 2, 2)
  refused(config, "model", "config: dit.patch_size is (2, 2, 2): an image is one latent frame")


def test_text_length(config):
  config.data.text_len = 0
  refused(config, "model", "config: data.text_len is 0; it must be positive")


def test_training_batch_against_the_mesh(config):
  config.data.segmentation.global_batch_size = 12
  refused(
    config,
    "train",
    "config: data.segmentation.global_batch_size gives a global batch of 12, which does not "
    "split over the 8 batch shards of the mesh {'data': 1, 'fsdp': 8, 'tensor': 1}",
  )
  config.mesh = dict(data=1, fsdp=2, tensor=4)  # 2 batch shards.
  validate(config, "train")


def test_evaluation_batch_against_the_mesh(config):
  config.eval.batch_size = 3
  refused(
    config,
    "eval",
    "config: eval.batch_size (3 per process x 1 processes) gives a global batch of 3, which "
    "does not split over the 8 batch shards",
  )


def test_mesh_that_does_not_fit_the_devices(config):
  config.mesh = dict(data=3, fsdp=-1, tensor=1)
  refused(config, "train", "mesh sizes [3, -1, 1] do not divide 8 devices")


def test_unknown_mode(config):
  with pytest.raises(ValueError, match="mode 'predict' unknown"):
    validate(config, "predict")


def test_model_presets_import_no_jax():
  code = "import sys, configs.models; print(sorted({'jax', 'flax'} & set(sys.modules)))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_the_paper_mix_draws_semantic_classes_per_use():
  from configs import refcoco

  sources = refcoco.get_config("1.3b").data.segmentation.sources
  draws = {s["records"].split("/")[1]: s.get("classes_per_use") for s in sources}
  assert draws == {
    "refcoco_unc": None,
    "refcoco+_unc": None,
    "refcocog_umd": None,
    "ade20k": 3,
    "cocostuff": 3,
    "pascal_part": 3,
  }


def test_slices_off_tpu_are_one_per_process(config):
  """CPU devices have no TPU slices: mesh.slices > 1 needs one process per slice."""
  config.mesh = dict(data=1, fsdp=-1, tensor=1, slices=2)
  refused(
    config,
    "train",
    "mesh.slices is 2: devices without TPU slices (CPU, GPU) make one slice per process, and "
    "this job has 1 process(es): set --config.mesh.slices=1",
  )
  config.mesh.slices = 0
  refused(config, "train", "mesh.slices is 0: give a count >= 1, or -1 for the devices' own")
  config.mesh.slices = 1
  validate(config, "train")
