"""The benchmarks: each script runs on CPU at toy size."""

import json
import os
import re
import subprocess
import sys

import pytest

from genmask_jax.data import records, synthetic


def test_gpu_benchmark_tiny_runs_on_cpu():
  # One torch thread: spinning OpenMP threads stall badly on a busy shared CPU.
  env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.gpu",
      "--tiny",
      "--remat=dots_attention",
      "--dtype=bfloat16",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {}
  for line in result.stdout.splitlines():
    label = re.match(r"(train step \(s\)|segment batch \d \(masks/s\))\s+", line)
    if label:
      rows[label.group(1)] = [float(v) for v in line[label.end() :].split()]
  assert sorted(rows) == ["segment batch 1 (masks/s)", "train step (s)"], result.stdout
  for label, (ours, theirs, ratio) in rows.items():
    assert ours > 0 and theirs > 0, label
    # The columns are printed rounded (4 and 3 significant digits), hence the loose tolerance.
    assert ratio == pytest.approx(ours / theirs, rel=0.1, abs=0.01), label
  assert re.search(r"train peak memory \(GiB\)\s+[\d.]+\s+n/a", result.stdout)
  assert "remat dots_attention; diffusers: SDPA, gradient checkpointing" in result.stdout
  # bf16 masks against fp32's on the same inputs: 0.991 measured (random masks would score ~0.33).
  iou = re.search(r"masks vs fp32 \(IoU\)\s+([\d.]+)", result.stdout)
  assert iou and 0.95 <= float(iou[1]) <= 1.0, result.stdout


def test_vlm_precompute_benchmark_tiny_runs_on_cpu():
  env = dict(os.environ, OMP_NUM_THREADS="1")
  result = subprocess.run(
    [sys.executable, "-m", "benchmarks.vlm_precompute", "--tiny"],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  rows = dict(re.findall(r"^(\S.*?)\s{2,}(\S+)", result.stdout, re.M))
  # 640x480 resized under 512*512 pixels: 420x588, 30x42 patches of 14, merged 2x2.
  assert rows["image tokens (640x480)"] == "315", result.stdout
  assert float(rows["samples/s at batch 1"]) > 0 and float(rows["samples/s at batch 4"]) > 0
  # The store holds the analytic bf16 rows plus its per-record overhead.
  analytic, stored = float(rows["analytic bytes/sample"]), float(rows["stored bytes/sample"])
  assert analytic < stored < 1.5 * analytic


def test_data_pipeline_benchmark_reads_local_and_gcs_stores():
  """The pipeline benchmark at toy sizes, with latent stores, local and from the emulator."""
  args = [
    "--resolution=64", "--num_samples=16", "--steps=2", "--workers", "0", "--latents", "--gcs",
    "--rounds=1", "--hidden=32", "--tokens=8", "--text_len=16", "--threads=2",
  ]  # fmt: skip
  env = dict(os.environ, PYTHONPATH=".")
  result = subprocess.run(
    [sys.executable, "-m", "benchmarks.data_pipeline", *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  line = re.search(r"workers 0: local ([\d.]+) samples/s, gs:// ([\d.]+) samples/s", result.stdout)
  assert line and float(line[1]) > 0 and float(line[2]) > 0, result.stdout


def test_demo_vae_benchmark_reports_round_trip(tmp_path):
  for split, n in (("train", 8), ("heldout", 4), ("gen", 4)):
    with records.RecordWriter(str(tmp_path / "data" / split), 100) as writer:
      for sample in synthetic.samples(split, n, image_size=64):
        writer.write(sample)
  result = subprocess.run(
    [sys.executable, "-m", "benchmarks.demo_vae", f"--workdir={tmp_path}", "--steps=2"],
    env=dict(os.environ, XLA_FLAGS=""),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.splitlines()[-1])
  assert report["steps"] == 2
  assert 0 <= report["mask_iou"] <= 1 and 0 <= report["colour_recall"] <= 1
  assert set(report["colour_rgb_distance"]) <= set(synthetic.COLORS)
  assert all(d >= 0 for d in report["colour_rgb_distance"].values())
