"""RefCOCO converters: REFER files, TFDS's refcoco.json and a prepared TFDS ref_coco agree.

The fixture is the upstream TFDS dummy `refcoco.json` (32 refs over refcoco unc/google,
refcoco+ unc, refcocog umd/google, every split name, one 3-polygon annotation); the REFER
files are derived from it by inverting TFDS's manual_download_process.py, the COCO images are
random JPEGs of the listed sizes, and the TFDS builder prepares ref_coco from the same files.
"""

import collections
import importlib.resources
import json
import os
import pickle
import sys

import numpy as np
import pytest
from conftest import shared_file
from PIL import Image
from pycocotools.coco import COCO

from genmask_jax.data import records
from genmask_jax.data.sources import refcoco
from launch import prepare_data

# TFDS's upstream dummy `refcoco.json`, in the shared/ folder (conftest.shared_file).
FIXTURE = "fixtures/refcoco_tfds_dummy/refcoco.json"
UPSTREAM_SPLITS = {
  ("refcoco", "unc"): {"train", "val", "testA", "testB"},
  ("refcoco", "google"): {"train", "val", "test"},
  ("refcoco+", "unc"): {"train", "val", "testA", "testB"},
  ("refcocog", "umd"): {"train", "val", "test"},
  ("refcocog", "google"): {"train", "val"},
}
TFDS_CONFIGS = {
  "refcoco_unc": ("refcoco", "unc", ["train", "validation", "testA", "testB"]),
  "refcocoplus_unc": ("refcoco+", "unc", ["train", "validation", "testA", "testB"]),
  "refcocog_umd": ("refcocog", "umd", ["train", "validation", "test"]),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("refcoco")
  with open(shared_file(FIXTURE)) as f:
    data = json.load(f)
  with open(root / "refcoco.json", "w") as f:
    json.dump(data, f)
  (root / "coco_train2014").mkdir()
  rng = np.random.default_rng(0)
  for entry in data["coco_anns"].values():
    info = entry["info"]
    pixels = rng.integers(0, 256, (info["height"], info["width"], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "coco_train2014" / info["file_name"], quality=80)
  for dataset in {r["dataset"] for r in data["ref"]}:
    refs = [r for r in data["ref"] if r["dataset"] == dataset]
    anns = {a["id"]: a for e in data["coco_anns"].values() for a in e["anns"]}
    anns.update({r["ann"]["id"]: r["ann"] for r in refs})
    instances = {
      "images": [e["info"] for e in data["coco_anns"].values()],
      "annotations": list(anns.values()),
      "categories": [{"id": c, "name": str(c)} for c in {a["category_id"] for a in anns.values()}],
    }
    (root / "refer" / dataset).mkdir(parents=True)
    with open(root / "refer" / dataset / "instances.json", "w") as f:
      json.dump(instances, f)
    for split_by in {r["dataset_partition"] for r in refs}:
      plain = [
        {k: v for k, v in r.items() if k not in ("ann", "dataset", "dataset_partition")}
        for r in refs
        if r["dataset_partition"] == split_by
      ]
      with open(root / "refer" / dataset / f"refs({split_by}).p", "wb") as f:
        pickle.dump(plain, f, protocol=2)  # As REFER's Python 2 pickles.
  return root, data


def _convert(argv):
  return prepare_data.main([*argv, "--shard_size", "4"])


def _read_all(path):
  return {split: list(records.RecordReader(str(path / split))) for split in os.listdir(path)}


@pytest.mark.parametrize(("dataset", "split_by"), sorted(UPSTREAM_SPLITS))
def test_refer_files_and_refcoco_json_give_the_same_records(files, tmp_path, dataset, split_by):
  root, data = files
  common = ["--dataset", dataset, "--split_by", split_by]
  refer_counts = _convert(
    ["refcoco-refer", "--refer_dir", str(root / "refer"), "--image_dir"]
    + [str(root / "coco_train2014"), "--output", str(tmp_path / "refer"), *common]
  )
  json_counts = _convert(
    ["refcoco-json", "--json", str(root / "refcoco.json"), "--output", str(tmp_path / "json")]
    + common
  )
  refs = [r for r in data["ref"] if (r["dataset"], r["dataset_partition"]) == (dataset, split_by)]
  expected = collections.Counter()
  for r in refs:
    expected[r["split"]] += len(r["sentences"])
  assert refer_counts == json_counts == dict(expected)
  assert set(refer_counts) == UPSTREAM_SPLITS[(dataset, split_by)]
  from_refer, from_json = _read_all(tmp_path / "refer"), _read_all(tmp_path / "json")
  assert from_refer == from_json
  for split, samples in from_refer.items():
    ids = {s["id"] for s in samples}
    assert len(ids) == len(samples)  # One record per (ref, sentence).
    for s in samples:
      assert s["id"].startswith(f"{dataset}_{split_by}/{split}/ann")
      assert s["source"]["split"] == split and s["task"] == "segmentation"


def test_masks_equal_pycocotools_and_texts_follow_text_field(files, tmp_path):
  root, data = files
  common = ["--dataset", "refcocog", "--split_by", "google", "--json", str(root / "refcoco.json")]
  _convert(["refcoco-json", *common, "--output", str(tmp_path / "sent")])
  _convert(["refcoco-json", *common, "--output", str(tmp_path / "raw"), "--text_field", "raw"])
  coco = COCO(str(root / "refer" / "refcocog" / "instances.json"))
  refs = [
    r for r in data["ref"] if (r["dataset"], r["dataset_partition"]) == ("refcocog", "google")
  ]
  sentences = {s["sent_id"]: s for r in refs for s in r["sentences"]}
  checked_polygons = []
  for split in UPSTREAM_SPLITS[("refcocog", "google")]:
    raw = list(records.RecordReader(str(tmp_path / "raw" / split)))
    for sample, raw_sample in zip(
      records.RecordReader(str(tmp_path / "sent" / split)), raw, strict=True
    ):
      ann = coco.anns[sample["source"]["ann_id"]]
      expected = coco.annToMask(ann)
      mask = records.decode_mask(sample)
      np.testing.assert_array_equal(mask, expected)
      assert mask.sum() > 0 and set(np.unique(mask)) <= {0, 1}
      checked_polygons.append(len(ann["segmentation"]))
      assert sample["text"] == sentences[sample["source"]["sent_id"]]["sent"]
      assert raw_sample["text"] == sentences[sample["source"]["sent_id"]]["raw"]
  assert max(checked_polygons) == 3  # The multi-polygon annotation was among them.


def test_refs_pickle_loader_builds_plain_data_only(tmp_path):
  class Exploit:
    def __reduce__(self):
      return (os.system, ("echo owned",))

  (tmp_path / "evil.p").write_bytes(pickle.dumps([{"ref_id": 1, "x": Exploit()}], protocol=2))
  with pytest.raises(records.RecordError, match=r"evil.p: .*refusing to load .*system"):
    refcoco.load_refs_pickle(str(tmp_path / "evil.p"))
  (tmp_path / "set.p").write_bytes(pickle.dumps([{"ids": {1, 2}}], protocol=2))
  with pytest.raises(records.RecordError, match="refusing to load"):
    refcoco.load_refs_pickle(str(tmp_path / "set.p"))
  refs = [{"ref_id": 7, "sentences": [{"raw": "caf\u00e9", "tokens": ["a"]}], "box": (1.5, 2)}]
  (tmp_path / "ok.p").write_bytes(pickle.dumps(refs, protocol=2))
  assert refcoco.load_refs_pickle(str(tmp_path / "ok.p")) == refs


@pytest.fixture(scope="module")
def tfds_dir(files, tmp_path_factory):
  """TFDS `ref_coco` prepared from the fixture by the upstream builder, without TensorFlow.

  tensorflow-datasets 4.9.10 writes these nested features with TensorFlow in one place only,
  `TensorInfo.dtype` (a tf.DType where the NumPy dtype serves the same), and its builder
  imports `importlib_resources`; both are stood in for here, while preparing.
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.features import feature

  root, _ = files
  data_dir = tmp_path_factory.mktemp("tfds")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(feature.TensorInfo, "dtype", property(lambda self: self.np_dtype))
    patch.setitem(sys.modules, "importlib_resources", importlib.resources)
    for config in TFDS_CONFIGS:
      tfds.builder(
        f"ref_coco/{config}", data_dir=str(data_dir), file_format="array_record"
      ).download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  return data_dir


@pytest.mark.parametrize("config", sorted(TFDS_CONFIGS))
def test_prepared_tfds_gives_the_same_samples(files, tfds_dir, tmp_path, config):
  root, _ = files
  dataset, split_by, tfds_splits = TFDS_CONFIGS[config]
  _convert(
    ["refcoco-json", "--json", str(root / "refcoco.json"), "--dataset", dataset]
    + ["--split_by", split_by, "--text_field", "raw", "--output", str(tmp_path / "json")]
  )
  counts = _convert(
    ["refcoco-tfds", "--data_dir", str(tfds_dir), "--config", config, "--splits", *tfds_splits]
    + ["--output", str(tmp_path / "tfds")]
  )
  assert set(counts) == UPSTREAM_SPLITS[(dataset, split_by)]  # "validation" is stored as "val".
  from_json, from_tfds = _read_all(tmp_path / "json"), _read_all(tmp_path / "tfds")
  assert from_json.keys() == from_tfds.keys()
  for split, samples in from_tfds.items():
    expected = {s["id"]: s for s in from_json[split]}
    assert sorted(s["id"] for s in samples) == sorted(expected)
    for sample in samples:  # Identical but for the ref id, which TFDS does not keep.
      want = expected[sample["id"]]
      assert sample == {**want, "source": {**want["source"], "ref_id": None}}


def test_refuses_finished_output(files, tmp_path):
  """Finished stores are refused without --overwrite; a folder a failed run left (no store
  finished) is redone."""
  root, _ = files
  argv = ["refcoco-json", "--json", str(root / "refcoco.json"), "--dataset", "refcoco"]
  argv += ["--split_by", "unc", "--output", str(tmp_path / "old")]
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "x").write_text("")
  first = _convert(argv)
  with pytest.raises(SystemExit, match="holds finished stores .*--overwrite"):
    _convert(argv)
  assert _convert([*argv, "--overwrite"]) == first
