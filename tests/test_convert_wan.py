"""launch/convert_wan.py end to end: a DiT file to an Orbax checkpoint restored into a sharding."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import save_file
from test_dit import setup

from genmask_jax.conversion import weights
from genmask_jax.conversion.dit import convert_dit_file


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
