"""Converters of semantic segmentation (LISA's recipe), ReasonSeg and text-to-image pairs."""

import collections
import json

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from genmask_jax.data import records
from genmask_jax.data.sources import reasonseg, semseg, text_image
from launch import prepare_data


def _jpeg(path, height, width, seed=0):
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path, quality=85)


def _read(path):
  return list(records.RecordReader(str(path)))


@pytest.fixture
def ade20k(tmp_path):
  root = tmp_path / "ADEChallengeData2016"
  lines = ["Idx\tRatio\tTrain\tVal\tName"]
  lines += [f"{i}\t0.01\t1\t1\tthing{i}, synonym{i} " for i in range(1, 151)]
  (root / "images" / "training").mkdir(parents=True)
  (root / "annotations" / "training").mkdir(parents=True)
  (root / "objectInfo150.txt").write_text("\n".join(lines) + "\n")
  rng = np.random.default_rng(0)
  for k, values in enumerate([[0, 1, 2, 5, 9, 17, 40, 150], [0, 3], [0], [4, 8, 15, 16, 23, 42]]):
    _jpeg(root / "images" / "training" / f"img{k}.jpg", 12, 16, k)
    label = rng.choice(np.array(values, np.uint8), (12, 16))
    label.flat[: len(values)] = values  # Every listed value is present.
    cv2.imwrite(str(root / "annotations" / "training" / f"img{k}.png"), label)
  return root


def test_ade20k_binary_masks(ade20k, tmp_path):
  counts = prepare_data.main(
    ["ade20k", "--root", str(ade20k), "--splits", "training", "--output", str(tmp_path / "o")]
  )
  samples = _read(tmp_path / "o" / "training")
  assert counts == {"training": len(samples)}
  by_image = {}
  for s in samples:
    by_image.setdefault(s["source"]["image"], []).append(s["source"]["class_id"])
    label = cv2.imread(str(ade20k / "annotations" / "training" / f"{s['source']['image']}.png"), 0)
    c = s["source"]["class_id"]
    np.testing.assert_array_equal(records.decode_mask(s), (label == c + 1).astype(np.uint8))
    assert s["text"] == f"thing{c + 1}"  # First synonym of class c (label c + 1).
    assert s["id"] == f"ade20k/training/{s['source']['image']}/{c}"
  # Every present class, once (training draws per use); label 0 ("other") is never a class;
  # img2 has none.
  assert by_image["img0"] == [0, 1, 4, 8, 16, 39, 149] and by_image["img1"] == [2]
  assert sorted(by_image) == ["img0", "img1", "img3"] and by_image["img3"] == [3, 7, 14, 15, 22, 41]
  assert records.RecordReader(str(tmp_path / "o" / "training")).meta.info["classes_per_image"] == 0


def test_class_draws_are_seeded_and_independent_of_the_other_images(ade20k):
  names = semseg.ade20k_class_names(str(ade20k / "objectInfo150.txt"))
  files = semseg.paired_files(str(ade20k / "images/training"), str(ade20k / "annotations/training"))

  def draw(subset, seed):
    samples = semseg.label_map_samples(
      "ade20k", "training", subset, semseg.ade20k_classes, names, classes_per_image=3, seed=seed
    )
    return [s["id"] for s in samples]

  everything = draw(files, 0)
  per_image = collections.Counter(i.split("/")[2] for i in everything)
  assert per_image == {"img0": 3, "img1": 1, "img3": 3}
  assert everything == draw(files, 0)
  assert draw(files[3:], 0) == [i for i in everything if "/img3/" in i]
  assert draw(files, 1) != everything


def test_cocostuff_dash_classes_are_ignored(tmp_path):
  names = [f"class{i}" for i in range(182)]
  names[5], names[9] = "wall-other", "floor-wood"
  labels = ["0: unlabeled"] + [f"{i + 1}: {n}" for i, n in enumerate(names)]
  (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n")
  (tmp_path / "images").mkdir()
  (tmp_path / "labels").mkdir()
  label = np.array([[5, 5, 9, 9], [1, 1, 255, 181], [0, 9, 5, 181]], np.uint8)
  cv2.imwrite(str(tmp_path / "labels" / "a.png"), label)
  _jpeg(tmp_path / "images" / "a.jpg", 3, 4)
  args = ["--image_dir", str(tmp_path / "images"), "--label_dir", str(tmp_path / "labels")]
  args += ["--labels", str(tmp_path / "labels.txt"), "--classes_per_image", "5"]
  prepare_data.main(["cocostuff", *args, "--output", str(tmp_path / "o")])
  samples = _read(tmp_path / "o" / "train2017")
  assert sorted(s["source"]["class_id"] for s in samples) == [0, 1, 181]
  assert sorted(s["text"] for s in samples) == ["class0", "class1", "class181"]
  for s in samples:
    np.testing.assert_array_equal(records.decode_mask(s), label == s["source"]["class_id"])
  cv2.imwrite(str(tmp_path / "labels" / "a.png"), np.full((3, 4), 200, np.uint8))
  with pytest.raises(records.RecordError, match=r"a.png: label values \[200\]"):
    prepare_data.main(["cocostuff", *args, "--output", str(tmp_path / "o2")])


def test_pascal_part_merges_a_part_and_names_it(tmp_path):
  _jpeg(tmp_path / "x.jpg", 20, 30)
  square = [[2, 2, 10, 2, 10, 10, 2, 10]]
  data = {
    "images": [{"id": 3, "file_name": "x.jpg", "height": 20, "width": 30}],
    "categories": [{"id": 1, "name": "dog:head"}, {"id": 2, "name": "potted_plant:pot"}],
    "annotations": [
      {"id": 10, "image_id": 3, "category_id": 1, "segmentation": square},
      {"id": 11, "image_id": 3, "category_id": 1, "segmentation": [[15, 5, 25, 5, 20, 15]]},
      {"id": 12, "image_id": 3, "category_id": 2, "segmentation": [[0, 12, 8, 12, 8, 19, 0, 19]]},
    ],
  }
  (tmp_path / "parts.json").write_text(json.dumps(data))
  samples = list(semseg.pascal_part_samples(str(tmp_path / "parts.json"), str(tmp_path), "train"))
  assert [s["id"] for s in samples] == ["pascal_part/train/3/1", "pascal_part/train/3/2"]
  assert samples[0]["text"] in ("dog head", "the head of the dog")
  assert samples[1]["text"] in ("potted plant pot", "the pot of the potted plant")

  def coco(polygons):
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, 20, 30)))

  head = coco(square) | coco([[15, 5, 25, 5, 20, 15]])
  np.testing.assert_array_equal(records.decode_mask(samples[0]), head)
  # Over many seeds both phrasings occur.
  texts = {
    next(semseg.pascal_part_samples(str(tmp_path / "parts.json"), str(tmp_path), "t", seed=k))[
      "text"
    ]
    for k in range(12)
  }
  assert texts == {"dog head", "the head of the dog"}


def _reasonseg_fixture(folder, name, texts, shapes, size=(40, 50)):
  folder.mkdir(parents=True, exist_ok=True)
  _jpeg(folder / f"{name}.jpg", *size)
  ann = {"text": texts, "is_sentence": True, "shapes": shapes}
  (folder / f"{name}.json").write_text(json.dumps(ann))


def test_reasonseg_ignore_regions_are_255(tmp_path):
  shapes = [
    {"label": "ignore", "points": [[20, 10], [30, 10], [30, 20], [20, 20]]},  # Listed first...
    {"label": "target", "points": [[5, 5], [45, 5], [45, 35], [5, 35]]},
    {"label": "flag", "points": [[0, 0], [49, 0], [49, 39], [0, 39]]},  # Skipped.
  ]
  _reasonseg_fixture(tmp_path / "ReasonSeg" / "train", "a", ["why?", "where?"], shapes)
  _reasonseg_fixture(tmp_path / "ReasonSeg" / "val", "b", ["what?", "how?"], shapes[1:])
  counts = prepare_data.main(
    ["reasonseg", "--root", str(tmp_path / "ReasonSeg"), "--splits", "train", "val"]
    + ["--output", str(tmp_path / "o")]
  )
  assert counts == {"train": 2, "val": 1}  # Every query for training, the first for evaluation.
  train = _read(tmp_path / "o" / "train")
  assert [s["text"] for s in train] == ["why?", "where?"]
  assert train[1]["source"] == {
    "dataset": "reasonseg",
    "split": "train",
    "image": "a",
    "text_index": 1,
    "is_sentence": True,
  }
  mask = records.decode_mask(train[0])
  # ...but drawn last (smaller area), so the ignore region survives inside the target.
  assert mask[15, 25] == 255 and mask[10, 20] == 255 and mask[20, 30] == 255
  assert mask[25, 10] == 1 and mask[5, 5] == 1 and mask[35, 45] == 1  # Outline included.
  assert mask[2, 2] == 0 and mask[38, 48] == 0  # The flag shape was skipped.
  expected = np.zeros((40, 50), np.uint8)
  cv2.fillPoly(expected, np.array([shapes[1]["points"]], np.int32), 1)
  cv2.fillPoly(expected, np.array([shapes[0]["points"]], np.int32), 255)
  np.testing.assert_array_equal(mask, expected)
  (val,) = _read(tmp_path / "o" / "val")
  assert val["text"] == "what?" and 255 not in records.decode_mask(val)


def test_reasonseg_bad_json_names_the_file(tmp_path):
  (tmp_path / "s").mkdir()
  _jpeg(tmp_path / "s" / "c.jpg", 8, 8)
  (tmp_path / "s" / "c.json").write_text(json.dumps({"text": [], "shapes": []}))
  with pytest.raises(records.RecordError, match=r"c.json: 'text' must be a non-empty list"):
    list(reasonseg.reasonseg_samples(str(tmp_path / "s"), "val"))


def test_text_image_folder_and_jsonl(tmp_path):
  folder = tmp_path / "pairs"
  (folder / "sub").mkdir(parents=True)
  _jpeg(folder / "a.jpg", 10, 12)
  Image.new("RGB", (7, 5), (10, 200, 30)).save(folder / "sub" / "b.webp", lossless=True)
  (folder / "a.txt").write_text("a photo of noise\n")
  (folder / "sub" / "b.txt").write_text("green")
  samples = list(text_image.folder_samples(str(folder), "mine"))
  assert [s["id"] for s in samples] == ["mine/a", "mine/sub/b"]
  assert [s["text"] for s in samples] == ["a photo of noise", "green"]
  assert samples[0]["image"] == (folder / "a.jpg").read_bytes()  # Kept as stored.
  assert samples[1]["image_format"] == "png"  # WebP transcoded losslessly.
  np.testing.assert_array_equal(records.decode_image(samples[1]), np.full((5, 7, 3), (10, 200, 30)))
  assert all(s["task"] == "generation" and s["mask"] is None for s in samples)

  lines = [{"image": "pairs/a.jpg", "caption": "one", "id": "x1"}, {"image": "pairs/a.jpg"}]
  (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
  with pytest.raises(records.RecordError, match=r"c.jsonl:2: expected"):
    list(text_image.jsonl_samples(str(tmp_path / "c.jsonl"), "j"))
  lines[1]["caption"] = "two"
  (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
  counts = prepare_data.main(
    ["text-image", "--jsonl", str(tmp_path / "c.jsonl"), "--name", "j"]
    + ["--output", str(tmp_path / "o")]
  )
  assert counts == {"train": 2}
  assert [s["id"] for s in _read(tmp_path / "o" / "train")] == ["j/x1", "j/2"]

  (folder / "a.txt").unlink()
  with pytest.raises(records.RecordError, match=r"a.jpg: no caption file"):
    list(text_image.folder_samples(str(folder), "mine"))
