"""Data-parallel evaluation sums: the same numbers on 1 and 8 devices, on 1 and 2 processes,
whatever the batch size, with padding never counted."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from processes import PORT_TAKEN, Processes, free_port, wait

from genmask_jax.evaluation import metrics, reduce
from genmask_jax.runtime import sharding

SQUARE, PADDED_HW = 16, (24, 24)
ARGS = ("logits", "gt", "original_hw", "resized_hw", "valid")  # make_batch_sums' arguments.


def make_split(count: int, seed: int) -> dict:
  """Samples of random original sizes, resized (longest side SQUARE) as the pipeline does.
  Masks are rectangles with a few ignored pixels, at the original size and padded to PADDED_HW
  with 255; logits (n, S, S) are the resized mask plus noise growing with the sample index
  (IoUs from 1 down), over junk padding."""
  rng = np.random.default_rng(seed)
  original = rng.integers(5, PADDED_HW[0] + 1, (count, 2))
  resized = np.round(original * SQUARE / original.max(1, keepdims=True)).astype(int)
  logits = rng.normal(size=(count, SQUARE, SQUARE)).astype(np.float32)
  masks, padded = [], np.full((count, *PADDED_HW), metrics.IGNORE, np.uint8)
  for k, ((h, w), (rh, rw)) in enumerate(zip(original, resized, strict=True)):
    mask = np.zeros((h, w), np.uint8)
    if k > 0:  # Sample 0: empty target.
      top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
      mask[top : rng.integers(top + 1, h + 1), left : rng.integers(left + 1, w + 1)] = 1
      mask[rng.random((h, w)) < 0.05] = metrics.IGNORE
    masks.append(mask)
    padded[k, :h, :w] = mask
    nearest = (mask[(np.arange(rh) * h) // rh][:, (np.arange(rw) * w) // rw] == 1) * 4.0 - 2.0
    logits[k, :rh, :rw] = nearest + 3.0 * k / count * rng.normal(size=(rh, rw))
  return dict(logits=logits, masks=masks, gt=padded, original_hw=original, resized_hw=resized)


def batches(split: dict, batch_size: int):
  """Global batches, valid flags and sample indices. The last batch is padded with copies of
  the first samples marked invalid (LISA-style duplicates: counting them changes the metrics)."""
  count = len(split["logits"])
  for start in range(0, count, batch_size):
    index = np.arange(start, start + batch_size) % count
    valid = np.arange(start, start + batch_size) < count
    yield {k: split[k][index] for k in ARGS[:-1]}, valid, index


def host_reference(split: dict) -> metrics.IoUSums:
  """Scored sample by sample in numpy at the original size, every sample once."""
  n = len(split["logits"])
  i, u = reduce.stats_at_original(
    split["logits"], split["masks"], split["original_hw"], split["resized_hw"], np.ones(n, bool)
  )
  return metrics.IoUSums.of_samples(i, u)


def device_sums(split: dict, mesh_shape, batch_size: int) -> metrics.IoUSums:
  devices = jax.devices()[: int(np.prod(mesh_shape))]
  auto = (jax.sharding.AxisType.Auto,) * 3
  mesh = jax.make_mesh(mesh_shape, sharding.MESH_AXES, axis_types=auto, devices=devices)
  batch_sums = reduce.make_batch_sums(mesh)
  total = metrics.IoUSums()
  for batch, valid, _ in batches(split, batch_size):
    arrays = sharding.global_batch({**batch, "valid": valid}, mesh)
    sums = batch_sums(*(arrays[k] for k in ARGS))
    assert all(x.sharding.is_fully_replicated for x in sums.values())
    total = total + metrics.IoUSums.from_sums(jax.device_get(sums))
  return total


def assert_same_sums(got: metrics.IoUSums, want: metrics.IoUSums, pixels: int = 0):
  """Counts and hits equal, pixel sums within `pixels`, the float IoU sum up to rounding."""
  assert (got.count, got.hits) == (want.count, want.hits)
  assert abs(got.intersection - want.intersection) <= pixels
  assert abs(got.union - want.union) <= pixels
  assert got.iou == pytest.approx(want.iou, rel=1e-6 + pixels / want.union)


@pytest.fixture(scope="module")
def split():
  return make_split(12, seed=0)


def test_same_metrics_on_one_and_eight_devices_and_any_batch_size(split):
  one_device = device_sums(split, (1, 1, 1), batch_size=4)  # 12 = 3 x 4.
  assert one_device.count == 12
  for mesh_shape, batch_size in [
    ((1, 1, 1), 5),  # 12 = 2 x 5 + 2, padded by 3.
    ((8, 1, 1), 8),  # Padded by 4.
    ((2, 4, 1), 16),  # Padded by 4, every sample on its own device.
    ((2, 2, 2), 4),  # Divides; the tensor axis holds replicas.
    ((1, 4, 2), 8),
  ]:
    assert_same_sums(device_sums(split, mesh_shape, batch_size), one_device)


def test_device_sums_match_scoring_each_sample_on_host(split):
  # Host (cv2) and device (jax) bilinear differ by ~1e-5 in logits, which could flip a pixel
  # whose interpolated logit is ~0: allow one pixel per sample.
  got, want = device_sums(split, (2, 2, 2), batch_size=8), host_reference(split)
  assert want.count == 12 and want.union > 500
  assert_same_sums(got, want, pixels=12)


def test_device_sums_ignore_pixels_outside_the_original_image(split):
  zero_padded = {**split, "gt": np.zeros_like(split["gt"])}
  for k, m in enumerate(split["masks"]):  # Zero padding; ignored pixels inside the image stay.
    zero_padded["gt"][k, : m.shape[0], : m.shape[1]] = m
  assert_same_sums(device_sums(zero_padded, (8, 1, 1), 8), device_sums(split, (8, 1, 1), 8))


WORKER = """
import dataclasses, json, os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
process, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process)
import numpy as np
from genmask_jax.evaluation import metrics
from genmask_jax.runtime import sharding
from genmask_jax.evaluation import reduce
from tests.test_evaluation_sharded import ARGS, batches, make_split

split = make_split(11, seed=1)
mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 1})
batch_sums = reduce.make_batch_sums(mesh)
device, host = metrics.IoUSums(), metrics.IoUSums()
for batch, valid, index in batches(split, 8):
  rows = slice(4 * process, 4 * process + 4)  # This process's half of the global batch.
  local = {k: v[rows] for k, v in batch.items()}
  arrays = sharding.global_batch({**local, "valid": valid[rows]}, mesh)
  sums = batch_sums(*(arrays[k] for k in ARGS))
  device = device + metrics.IoUSums.from_sums(jax.device_get(sums))
  logits = reduce.local_rows(arrays["logits"])  # As the model's sharded output comes back.
  masks = [split["masks"][k] for k in index[rows]]
  i, u = reduce.stats_at_original(
    logits, masks, local["original_hw"], local["resized_hw"], valid[rows]
  )
  host = host + reduce.gather_sums(i, u, valid[rows])
with open(out, "w") as f:
  json.dump({"device": dataclasses.asdict(device), "host": dataclasses.asdict(host)}, f)
"""


@pytest.mark.xdist_group("heavy")
def test_two_processes_give_every_process_the_single_process_result(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # The worker imports this module, which imports tests/processes.py.
  pythonpath = f"{root}{os.pathsep}{os.path.join(root, 'tests')}"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONPATH": pythonpath}
  for attempt in range(3):  # Again on another port if one was taken before the coordinator's bind.
    port = free_port()
    with Processes() as processes:
      workers = [
        processes.start(
          [sys.executable, "-c", WORKER, str(p), str(port), str(tmp_path / f"{p}.json")],
          tmp_path / f"log{p}-{attempt}.txt",
          cwd=root,
          env=env,
        )
        for p in range(2)
      ]
      # A failed worker leaves the other waiting in a collective: wait() stops at the first
      # failure, and leaving the block kills what is left.
      wait(workers, [str(tmp_path)])
      processes.kill()
      logs = [processes.log(w) for w in workers]
    if all(w.returncode == 0 for w in workers) or not any(map(PORT_TAKEN.search, logs)):
      break
  for w, log in zip(workers, logs, strict=True):
    assert w.returncode == 0, log[-3000:]
  want = host_reference(make_split(11, seed=1))
  assert want.count == 11
  results = [json.loads((tmp_path / f"{p}.json").read_text()) for p in range(2)]
  assert results[0] == results[1]
  host, device = (
    metrics.IoUSums(**{**results[0][k], "hits": tuple(results[0][k]["hits"])})
    for k in ("host", "device")
  )
  assert_same_sums(host, want)
  assert_same_sums(device, want, pixels=11)


@pytest.mark.parametrize("count, batch_size, size", [(5, 3, 4), (9, 8, 8), (2, 8, 4)])
def test_padded_batches_split_over_the_mesh_and_pad_the_last(count, batch_size, size):
  """Inference batches: one size (a multiple of the batch axes, data x fsdp = 4 here), items in
  order, the last batch padded with its last item and its real rows counted."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2, 1), sharding.MESH_AXES)
  items = [{"x": np.full((3,), i, np.float32), "skip": i} for i in range(count)]
  batches = list(sharding.padded_batches(items, ["x"], mesh, batch_size))
  rows = np.concatenate([np.asarray(batch["x"])[:real, 0] for batch, real in batches])
  np.testing.assert_array_equal(rows, np.arange(count))
  assert {batch["x"].shape for batch, _ in batches} == {(size, 3)}
  last, real = batches[-1]
  assert (np.asarray(last["x"])[real:, 0] == count - 1).all()
  assert sum(real for _, real in batches) == count
