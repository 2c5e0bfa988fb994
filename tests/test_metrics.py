"""Metric definitions, undoing the input resize, and the report output."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from genmask_jax.data import resize
from genmask_jax.evaluation import metrics, reduce, report

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def reference_results(preds, gts):
  """The definitions written out pixel by pixel, sample by sample."""
  ious, total_i, total_u = [], 0, 0
  for pred, gt in zip(preds, gts, strict=True):
    i = u = 0
    for p, g in zip(pred.ravel(), gt.ravel(), strict=True):
      if g == 255:
        continue
      i += int(p and g == 1)
      u += int(p or g == 1)
    ious.append(i / u if u else 1.0)
    total_i, total_u = total_i + i, total_u + u
  out = {"gIoU": sum(ious) / len(ious), "cIoU": total_i / total_u}
  for t in THRESHOLDS:
    out[f"Prec@{t}"] = sum(iou >= t for iou in ious) / len(ious)
  out["samples"] = len(ious)
  return out


def random_samples(rng, count, shape):
  gts = rng.choice(np.array([0, 1, 255], np.uint8), size=(count, *shape), p=[0.5, 0.4, 0.1])
  preds = rng.random((count, *shape)) < 0.5
  gts[0], preds[0] = 0, False  # Empty target, empty prediction: IoU 1.
  gts[1], preds[1] = 255, True  # Everything ignored: U = 0 as well.
  gts[2], preds[2] = 0, True  # Empty target, non-empty prediction: IoU 0.
  return preds, gts


def test_metrics_match_the_definitions_on_random_masks():
  preds, gts = random_samples(np.random.default_rng(0), 40, (6, 5))
  i, u = metrics.intersection_union(preds, gts)
  got = metrics.IoUSums.of_samples(i, u).results()
  want = reference_results(preds, gts)
  assert got.keys() == want.keys()
  for key in want:
    assert got[key] == pytest.approx(want[key], abs=1e-12), key
  # The jax.numpy path gives the same per-sample counts.
  i_jax, u_jax = metrics.intersection_union(jnp.asarray(preds), jnp.asarray(gts), jnp)
  np.testing.assert_array_equal(np.asarray(i_jax), i)
  np.testing.assert_array_equal(np.asarray(u_jax), u)


def test_ignored_pixels_leave_intersection_and_union():
  gt = np.array([[1, 1, 255, 255], [0, 0, 0, 0]], np.uint8)
  pred = np.array([[1, 0, 1, 1], [0, 0, 0, 1]], bool)
  assert metrics.intersection_union(pred, gt) == (1, 3)


def test_toy_case_giou_and_ciou():
  gt = np.zeros((2, 8, 8), np.uint8)
  pred = np.zeros((2, 8, 8), bool)
  gt[0, 2:4, 2:4], pred[0, 2:4, 2:4] = 1, True  # Perfect, 4 pixels.
  gt[1, 0:4, 0:4], pred[1, 1:3, 1:3] = 1, True  # I = 4, U = 16.
  i, u = metrics.intersection_union(pred, gt)
  np.testing.assert_array_equal(i, [4, 4])
  np.testing.assert_array_equal(u, [4, 16])
  got = metrics.IoUSums.of_samples(i, u).results()
  assert got["gIoU"] == pytest.approx(0.625)
  assert got["cIoU"] == pytest.approx(0.4)
  assert got["Prec@0.5"] == 0.5 and got["samples"] == 2


def test_precision_counts_iou_equal_to_the_threshold():
  # IoU exactly 0.5, 0.6, 0.7, 0.8, 0.9 and just below 0.5.
  i = np.array([1, 3, 7, 4, 9, 499])
  u = np.array([2, 5, 10, 5, 10, 1000])
  got = metrics.IoUSums.of_samples(i, u).results()
  assert [got[f"Prec@{t}"] * 6 for t in THRESHOLDS] == pytest.approx([5, 4, 3, 2, 1])


def test_merging_sums_equals_summing_all_samples():
  preds, gts = random_samples(np.random.default_rng(1), 30, (4, 4))
  i, u = metrics.intersection_union(preds, gts)
  whole = metrics.IoUSums.of_samples(i, u)
  parts = metrics.IoUSums.of_samples(i[:11], u[:11]) + metrics.IoUSums.of_samples(i[11:], u[11:])
  assert parts.results() == pytest.approx(whole.results())
  merged = metrics.merge(
    {"val": metrics.IoUSums.of_samples(i[:11], u[:11])},
    {
      "val": metrics.IoUSums.of_samples(i[11:], u[11:]),
      "testA": metrics.IoUSums.of_samples(i[:3], u[:3]),
    },
  )
  by_split = metrics.results_by_split(merged)
  assert by_split["val"] == pytest.approx(whole.results())
  assert by_split["testA"]["samples"] == 3


def test_bad_input_raises():
  with pytest.raises(ValueError, match="shape"):
    metrics.intersection_union(np.zeros((2, 3), bool), np.zeros((3, 2), np.uint8))
  with pytest.raises(ValueError, match="0 <= I <= U"):
    metrics.IoUSums.of_samples([5], [4])
  with pytest.raises(ValueError, match="no samples"):
    metrics.IoUSums().results()


# A 300x200 (h x w) original, resized so its longest side is 512, padded to 512x512.
SQUARE, ORIGINAL, RESIZED = 512, (300, 200), (512, 341)
ROWS, COLS = (60, 240), (40, 190)  # The known foreground rectangle, half-open.


def rectangle_logits():
  """Logits at 512x512 whose zero level set is the rectangle's boundary in original pixel
  coordinates (signed distance, + inside); the padding holds +10, foreground if it leaked."""
  logits = np.full((SQUARE, SQUARE), 10.0, np.float32)
  (h, w), (rh, rw) = ORIGINAL, RESIZED
  y = (np.arange(rh) + 0.5) * h / rh - 0.5  # Resized pixel centres in original coordinates.
  x = (np.arange(rw) + 0.5) * w / rw - 0.5
  y, x = y[:, None], x[None, :]
  inside = [y - (ROWS[0] - 0.5), (ROWS[1] - 0.5) - y, x - (COLS[0] - 0.5), (COLS[1] - 0.5) - x]
  logits[:rh, :rw] = np.minimum.reduce(np.broadcast_arrays(*inside))
  return logits


def test_prediction_at_512_is_scored_at_the_original_size():
  gt = np.zeros(ORIGINAL, np.uint8)
  gt[ROWS[0] : ROWS[1], COLS[0] : COLS[1]] = 1
  logits = rectangle_logits()
  restored = resize.undo_resize(logits, ORIGINAL, RESIZED)
  assert restored.shape == ORIGINAL
  np.testing.assert_array_equal(restored > 0, gt == 1)
  i, u = reduce.stats_at_original(
    logits[None], [gt], np.array([ORIGINAL]), np.array([RESIZED]), np.array([True])
  )
  assert i[0] == u[0] == 180 * 150
  # Without the crop, the padding is stretched into the image and the score collapses.
  stretched = resize.undo_resize(logits, ORIGINAL, (SQUARE, SQUARE)) > 0
  naive_i, naive_u = metrics.intersection_union(stretched, gt)
  assert naive_i / naive_u < 0.7


@pytest.mark.parametrize(
  "original, resized",
  [((300, 200), (64, 43)), ((20, 30), (43, 64)), ((64, 50), (64, 50)), ((7, 5), (64, 46))],
)
def test_device_undo_resize_matches_the_host_one(original, resized):
  logits = np.random.default_rng(2).normal(size=(1, 64, 64)).astype(np.float32)
  want = resize.undo_resize(logits[0], original, resized)
  got = reduce.undo_resize_padded(
    jnp.asarray(logits), jnp.array([original]), jnp.array([resized]), (300, 300)
  )
  h, w = original
  np.testing.assert_allclose(np.asarray(got)[0, :h, :w], want, atol=1e-4)


def test_bad_sizes_and_masks_raise():
  with pytest.raises(ValueError, match="do not fit"):
    resize.undo_resize(np.zeros((16, 16)), (30, 20), (17, 11))
  bad = np.zeros((4, 4), np.uint8)
  bad[0, 0] = 2
  with pytest.raises(ValueError, match=r"'ref-7'.*one of \(0, 1, 255\)"):
    reduce.stats_at_original(
      np.zeros((1, 8, 8)), [bad], np.array([[4, 4]]), np.array([[8, 8]]), [True], ids=["ref-7"]
    )


def test_results_json_and_console_table(tmp_path, capsys):
  results = {"val": {"gIoU": 0.625, "cIoU": 0.4, "samples": 2}, "testA": {"gIoU": 1.0}}
  for r in results.values():
    r.update({"cIoU": r.get("cIoU", 1.0), "samples": r.get("samples", 1)})
    r.update({f"Prec@{t}": 0.5 for t in THRESHOLDS})
  path = tmp_path / "eval" / "results.json"
  report.write_results(results, str(path))
  assert json.loads(path.read_text()) == results
  lines = capsys.readouterr().out.strip().splitlines()
  # One unit on the console and in the JSON, and the table says which.
  assert lines[0] == "gIoU (= mIoU), cIoU (= oIoU), Prec@t: fractions in [0, 1], as in results.json"
  assert lines[1].split() == ["split", *report.COLUMNS]
  assert lines[2].split() == ["val", "2", "0.6250", "0.4000"] + ["0.5000"] * 5
  assert lines[3].split()[:3] == ["testA", "1", "1.0000"]


def test_overlay_grid_is_a_png_of_the_expected_size(tmp_path):
  rng = np.random.default_rng(3)
  samples = []
  for h, w in [(30, 20), (16, 40)]:
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    truth = np.zeros((h, w), np.uint8)
    truth[: h // 2] = 1
    truth[-1] = 255
    samples.append((image, truth, rng.random((h, w)) < 0.5))
  paths = report.write_overlay_grids({"val": samples, "testB": samples[:1]}, str(tmp_path), 32)
  with Image.open(paths[0]) as grid:
    assert grid.format == "PNG" and grid.mode == "RGB" and grid.size == (3 * 32, 2 * 32)
    pixels = np.asarray(grid).astype(int)
  with Image.open(paths[1]) as grid:
    assert grid.size == (3 * 32, 32)
  # The first sample's ground-truth tile: green tint on the foreground top half.
  red, green = pixels[4, 32 + 4, 0], pixels[4, 32 + 4, 1]
  original_red, original_green = samples[0][0][int(4 * 30 / 32), int(4 * 20 / 32)][:2]
  assert green - red > int(original_green) - int(original_red)
  with pytest.raises(ValueError, match="share one"):
    report.overlay_grid([(samples[0][0], samples[1][1], samples[0][2])])
