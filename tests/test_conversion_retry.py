"""Conversions and preparations never block their own retry: an output left by a failed run is
redone without --overwrite; a finished one is refused unless --overwrite. Optional ReasonSeg
splits that do not exist are skipped with a message."""

import os
import subprocess
import sys

import pytest
from safetensors.numpy import save_file
from test_data_sources import _reasonseg_fixture
from test_dit import setup

from genmask_jax.conversion import weights
from genmask_jax.data import records
from launch import prepare_data

SYNTHETIC = ["synthetic", "--num_train=8", "--num_val=4", "--num_heldout=4", "--num_gen=4"]
SQUARE = [{"label": "target", "points": [[5, 5], [45, 5], [45, 35], [5, 35]]}]


def test_prepare_data_redoes_an_unfinished_output_and_refuses_a_finished_one(tmp_path):
  out = tmp_path / "data"
  (out / "train").mkdir(parents=True)
  # A shard cut short, no store.json: a conversion that stopped.
  (out / "train" / "records-00000-of-00001-00000.array_record").write_bytes(b"cut short")
  counts = prepare_data.main([*SYNTHETIC, f"--output={out}"])
  assert len(records.RecordReader(str(out / "train"))) == counts["train"] == 8
  with pytest.raises(SystemExit, match=r"holds finished stores \(gen, heldout, train, val\)"):
    prepare_data.main([*SYNTHETIC, f"--output={out}"])
  assert prepare_data.main([*SYNTHETIC, f"--output={out}", "--overwrite"]) == counts


def test_reasonseg_skips_missing_optional_splits_and_names_missing_requested_ones(tmp_path, capsys):
  root = tmp_path / "ReasonSeg"
  _reasonseg_fixture(root / "train", "a", ["why?"], SQUARE)
  _reasonseg_fixture(root / "val", "b", ["what?"], SQUARE)
  counts = prepare_data.main(["reasonseg", f"--root={root}", f"--output={tmp_path / 'o'}"])
  assert counts == {"train": 1, "val": 1}
  assert f"skipping split 'test': {root / 'test'} does not exist" in capsys.readouterr().out
  with pytest.raises(SystemExit, match=f"--splits: no folder {root / 'test'}"):
    prepare_data.main(
      ["reasonseg", f"--root={root}", "--splits", "val", "test", f"--output={tmp_path / 'p'}"]
    )


def test_convert_wan_redoes_a_failed_conversion_and_refuses_a_finished_one(tmp_path):
  _, _, state = setup()
  source = str(tmp_path / "diffusion_pytorch_model.safetensors")
  save_file(state, source)
  out = tmp_path / "converted"
  (out / "dit").mkdir(parents=True)  # Left by a run that failed before conversion.json.
  command = [sys.executable, "-m", "launch.convert_wan", "--config=configs/genmask.py:tiny"]
  command += [f"--dit={source}", f"--out={out}"]
  env = dict(os.environ, PYTHONPATH=".")

  def convert(*flags):
    return subprocess.run(command + list(flags), env=env, capture_output=True, text=True)

  result = convert()
  assert result.returncode == 0, result.stderr[-3000:]
  assert weights.read_record(str(out))["sources"] == {"dit": source}
  result = convert()
  assert result.returncode != 0 and "holds a finished conversion; pass --overwrite" in (
    result.stderr
  )
  assert convert("--overwrite").returncode == 0
