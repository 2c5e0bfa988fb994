"""The store protocol (genmask_jax/data/store.py): completion, whole shards, alignment by index,
and stores of the layouts before it (refused with the upgrade command, then upgraded in place)."""

import dataclasses
import json
import os

import numpy as np
import pytest

from genmask_jax.data import encode_latents, features, latents, pipeline, records, store, synthetic
from genmask_jax.data.features import FeatureItem, FeatureMeta, FeatureReader, FeatureWriter
from genmask_jax.data.store import StoreError, StoreLayout
from genmask_jax.vlm import image_policy
from genmask_jax.vlm.prompts import prompt_template

POLICY = image_policy.DEFAULT.to_record()  # Every feature store records one.

MODEL, HIDDEN, SIZE = "enc", 4, 16


def _samples(path, n=10, shard_size=4) -> str:
  with records.RecordWriter(str(path), shard_size, info={"by": "test"}) as writer:
    for sample in synthetic.samples("train", n, image_size=SIZE):
      writer.write(sample)
  return str(path)


def _hidden(i: int) -> np.ndarray:
  return np.full((1 + i % 3, HIDDEN), i, np.float32)


def _features(path, ids, num_workers=2, shard_size=2, workers=None) -> str:
  meta = FeatureMeta(MODEL, prompt_template(), "float16", HIDDEN, POLICY)
  layout = StoreLayout(len(ids), num_workers, shard_size)
  for w in range(num_workers) if workers is None else workers:
    writer = FeatureWriter(str(path), meta, layout, w)
    for shard, start, stop in writer.pending_shards():
      writer.write_shard(shard, [FeatureItem(ids[i], "t", _hidden(i)) for i in range(start, stop)])
    writer.finalize()
  return str(path)


def _pooled(images: np.ndarray) -> np.ndarray:
  b, r = images.shape[:2]
  return np.tile(images.reshape(b, r // 4, 4, r // 4, 4, 3).mean((2, 4)), (1, 1, 1, 2))


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
  return _samples(tmp_path_factory.mktemp("samples"))


def test_metadata_names_kind_version_layout_and_what_rows_were_computed_with(samples, tmp_path):
  _features(tmp_path / "f", records.RecordReader(samples).ids())
  with open(tmp_path / "f" / store.META_FILE) as f:
    meta = json.load(f)
  assert meta == {
    "kind": "features",
    "format_version": store.FORMAT_VERSION,
    "layout": {"num_samples": 10, "num_workers": 2, "shard_size": 2},
    "meta": dataclasses.asdict(FeatureMeta(MODEL, prompt_template(), "float16", HIDDEN, POLICY)),
  }
  reader = records.RecordReader(samples)
  assert reader.layout == StoreLayout(10, 1, 4) and reader.meta.info == {"by": "test"}
  assert reader.meta.tasks == {"segmentation": 10}
  with pytest.raises(StoreError, match=f"{tmp_path / 'f'}: a features store, expected records"):
    records.RecordReader(str(tmp_path / "f"))


def test_a_store_is_complete_only_once_every_worker_has_finalized(samples, tmp_path):
  ids, out = records.RecordReader(samples).ids(), str(tmp_path / "f")
  assert not store.is_complete(out)  # Not even started.
  _features(out, ids, num_workers=3, workers=[0, 2])
  # Every shard of workers 0 and 2, and none of worker 1: not complete, and not readable.
  assert not store.is_complete(out)
  assert store.written_rows(out, features.KIND, StoreLayout(10, 3, 2)) == 3 + 4
  with pytest.raises(StoreError, match=rf"{out}: incomplete, workers \[1\] of 3 .*precompute_vlm"):
    FeatureReader(out)
  # Worker 1's shards, but not its part (killed before finalize): still not complete.
  meta = FeatureMeta(MODEL, prompt_template(), "float16", HIDDEN, POLICY)
  writer = FeatureWriter(out, meta, StoreLayout(10, 3, 2), 1)
  for shard, start, stop in writer.pending_shards():
    writer.write_shard(shard, [FeatureItem(ids[i], "t", _hidden(i)) for i in range(start, stop)])
  assert not writer.pending_shards() and not store.is_complete(out)
  assert writer.finalize() and store.is_complete(out)
  reader = FeatureReader(out)
  assert reader.ids() == ids and reader.meta.hidden_size == HIDDEN
  for i in range(10):
    np.testing.assert_array_equal(reader[i].hidden, _hidden(i))


def test_a_half_written_shard_is_never_visible(samples, tmp_path):
  ids, out = records.RecordReader(samples).ids(), str(tmp_path / "f")
  meta = FeatureMeta(MODEL, prompt_template(), "float16", HIDDEN, POLICY)
  writer = FeatureWriter(out, meta, StoreLayout(10, 1, 4), 0)

  def crash(local: dict[str, str]) -> None:
    with open(local["features"], "wb") as f:
      f.write(b"half a shard")
    raise KeyboardInterrupt("killed while writing")

  with pytest.raises(KeyboardInterrupt):
    writer.publish_shard(0, ids[:4], crash)
  assert sorted(os.listdir(out)) == [store.META_FILE]  # No shard, no temp file.
  # Its file published but not yet its ids (killed in between): the shard still counts as missing.
  open(os.path.join(out, "features-00000-of-00001-00001.array_record"), "wb").close()
  assert [s for s, _, _ in writer.pending_shards()] == [0, 1, 2] and not writer.finalize()
  writer.write_shard(1, [FeatureItem(ids[i], "t", _hidden(i)) for i in range(4, 8)])
  assert [s for s, _, _ in writer.pending_shards()] == [0, 2]


def test_a_writer_refuses_another_workers_count_or_encoder(samples, tmp_path):
  ids = records.RecordReader(samples).ids()
  out = _features(tmp_path / "f", ids, workers=[0])
  with pytest.raises(StoreError, match="was started with .*num_workers=2.*num_workers=3"):
    _features(out, ids, num_workers=3)
  _features(out, ids, workers=[1])
  # Complete: the same rows under another worker count are done, another encoder is refused.
  listing = sorted(os.listdir(out))
  _features(out, ids, num_workers=3)
  assert sorted(os.listdir(out)) == listing
  other = FeatureMeta("other", prompt_template(), "float16", HIDDEN, POLICY)
  with pytest.raises(StoreError, match="was started with .*'enc'.*'other'"):
    FeatureWriter(out, other, StoreLayout(10, 2, 2), 0)
  with pytest.raises(StoreError, match="worker index 2 outside"):
    FeatureWriter(
      out,
      FeatureMeta(MODEL, prompt_template(), "float16", HIDDEN, POLICY),
      StoreLayout(10, 2, 2),
      2,
    )


def test_rows_are_joined_by_index_and_misaligned_ids_are_named(samples, tmp_path):
  ids = records.RecordReader(samples).ids()
  join = lambda f: pipeline.JoinedSource(
    samples, f, task="segmentation", model_id=MODEL, template=prompt_template()
  )
  joined = join(_features(tmp_path / "good", ids))
  assert [int(joined[i]["hidden"][0, 0]) for i in range(10)] == list(range(10))

  swapped = ids[:3] + [ids[4], ids[3]] + ids[5:]
  out = _features(tmp_path / "swapped", swapped)
  with pytest.raises(StoreError, match=rf"{out}: no features for sample {ids[3]!r} \(index 3\)"):
    join(out)
  out = _features(tmp_path / "short", ids[:7])
  with pytest.raises(StoreError, match=rf"{out}: .*\(index 7\).*\(it ends at row 7\)"):
    join(out)
  out = _features(tmp_path / "long", ids + ["extra"])
  with pytest.raises(StoreError, match=rf"{out}: 11 rows for the 10 samples of {samples}"):
    join(out)


def test_latents_are_rows_of_the_same_protocol(samples, tmp_path):
  out = str(tmp_path / "l")
  kwargs = dict(vae="v", resolution=SIZE, num_workers=2, batch_size=3)
  assert not encode_latents.encode_store(_pooled, samples, out, worker_index=1, **kwargs)
  assert not store.is_complete(out)
  assert encode_latents.encode_store(_pooled, samples, out, worker_index=0, **kwargs)
  assert store.is_complete(out)
  reader = latents.LatentReader(out)
  assert reader.layout == StoreLayout(10, 2, latents.SHARD_SIZE)
  assert [sorted(s.files) for s in reader.shards] == [["image", "mask"]] * 2
  store.check_aligned(reader, records.RecordReader(samples))


@pytest.mark.parametrize("kind", ["records", "features", "latents"])
def test_a_store_without_todays_metadata_is_refused_with_the_command_that_rebuilds_it(
  samples, tmp_path, kind
):
  """A store.json of another format version, or one without a field this code records (a
  feature store without its image policy), names the command that writes the store afresh."""
  ids = records.RecordReader(samples).ids()
  if kind == "records":
    path, reader = _samples(tmp_path / "s"), records.RecordReader
  elif kind == "features":
    path, reader = _features(tmp_path / "f", ids), FeatureReader
  else:
    path, reader = str(tmp_path / "l"), latents.LatentReader
    encode_latents.encode_store(_pooled, samples, path, vae="v", resolution=SIZE)
  command = {
    "records": "prepare_data",
    "features": "precompute_vlm",
    "latents": "precompute_latents",
  }
  rebuild = rf"remove {path} and write it again with `python -m launch\.{command[kind]}`"
  meta_path = os.path.join(path, store.META_FILE)
  with open(meta_path) as f:
    meta = json.load(f)
  _write(path, store.META_FILE, dict(meta, format_version=1))
  with pytest.raises(StoreError, match=rf"format version 1, this code reads 2: {rebuild}"):
    reader(path)
  if kind == "features":
    del meta["meta"]["image_policy"]
    _write(path, store.META_FILE, meta)
    with pytest.raises(StoreError, match=rf"not the features store metadata .*{rebuild}"):
      reader(path)


def _write(path: str, name: str, obj) -> None:
  with open(os.path.join(path, name), "w") as f:
    json.dump(obj, f)
