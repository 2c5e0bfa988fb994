"""launch/convert_wan.py end to end: a DiT file to an Orbax checkpoint restored into a sharding."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import save_file
from test_dit import setup

from configs.models import wan_dit, wan_vae
from genmask_jax.conversion import weights
from genmask_jax.conversion.dit import convert_dit_file
from genmask_jax.conversion.tensor_files import CheckpointError
from genmask_jax.conversion.vae import vae_params_from_tensors


def run_convert(*args):
  return subprocess.run(
    [sys.executable, "-m", "launch.convert_wan", "--config=configs/genmask.py:tiny", *args],
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_convert_and_restore_sharded(tmp_path):
  _, _, state = setup()
  source = str(tmp_path / "diffusion_pytorch_model.safetensors")
  save_file(state, source)
  out = str(tmp_path / "converted")
  result = run_convert(f"--dit={source}", f"--out={out}")
  assert result.returncode == 0, result.stderr
  expected, _ = convert_dit_file(source, setup()[0])
  record = weights.read_record(out)
  assert record["sources"] == {"dit": source} and record["set_aside"] == {"dit": {}}

  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))

  def target(x):
    spec = PartitionSpec("fsdp") if x.shape[0] % 8 == 0 else PartitionSpec()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

  restored = weights.restore(out, "dit", jax.tree.map(target, expected))
  kernel = restored["blocks"]["ffn_in"]["kernel"]
  assert kernel.sharding.spec == PartitionSpec() and len(kernel.sharding.device_set) == 8
  emb = restored["patch_embedding"]["kernel"]  # (64, 64): first axis split in 8.
  assert emb.sharding.spec == PartitionSpec("fsdp")
  assert emb.addressable_shards[0].data.shape == (8, emb.shape[1])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored, expected)

  again = run_convert(f"--dit={source}", f"--out={out}")
  assert again.returncode != 0 and "--overwrite" in again.stderr


def test_restore_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="no converted 'vae' checkpoint"):
    weights.restore(str(tmp_path), "vae", {})


def test_a_checkpoint_of_another_size_is_summarized_before_the_key_lists(tmp_path):
  _, _, state = setup()  # The tiny preset, in the diffusers layout.
  source = str(tmp_path / "tiny.safetensors")
  save_file(state, source)
  with pytest.raises(CheckpointError) as info:
    convert_dit_file(source, wan_dit("small"))
  summary, keys = str(info.value).split("\n")
  assert summary == (
    f"{source}: checkpoint: num_layers 2, dim 64, ffn_dim 96, text_dim 32; "
    "config: num_layers 4, dim 128, ffn_dim 256, text_dim 64"
  )
  assert keys.startswith("missing keys (")


def test_a_vae_checkpoint_of_another_size_is_summarized_before_the_key_lists():
  tensors = {  # A WAN-2.1 VAE's first layers (base_dim 96, 16 latent channels), nothing more.
    "encoder.conv1.weight": np.zeros((96, 3, 3, 3, 3), np.float32),
    "conv1.weight": np.zeros((32, 32, 1, 1, 1), np.float32),
  }
  with pytest.raises(CheckpointError) as info:
    vae_params_from_tensors(tensors, wan_vae("tiny"), "wan_vae.pth")
  assert str(info.value).split("\n")[0] == (
    "wan_vae.pth: checkpoint: base_dim 96, z_dim 16, 0 encoder blocks; config: base_dim 8, "
    "z_dim 16, 11 encoder blocks (dim_mult (1, 2, 4, 4), num_res_blocks 2)"
  )
