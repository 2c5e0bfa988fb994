"""The feature store format (genmask_jax/data/features.py), without a VLM."""

import os
import pickle

import ml_dtypes
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from genmask_jax.data import features as F
from genmask_jax.data import store
from genmask_jax.vlm import image_policy

POLICY = image_policy.DEFAULT.to_record()  # Every feature store records one.

META = F.FeatureMeta("enc-a", "tmpl-a", "bfloat16", 8, POLICY)


def hidden_for(i: int) -> np.ndarray:
  return np.random.default_rng(i).normal(size=(3 + i, 8)).astype(np.float32)


def write_store(path, meta=META, num_samples=5, num_workers=2, shard_size=2) -> list[str]:
  layout = F.StoreLayout(num_samples, num_workers, shard_size)
  for w in range(num_workers):
    writer = F.FeatureWriter(str(path), meta, layout, w)
    for shard, start, stop in writer.pending_shards():
      items = [F.FeatureItem(f"id{i}", f"text {i}", hidden_for(i)) for i in range(start, stop)]
      writer.write_shard(shard, items)
    done = writer.finalize()
    assert done == (w == num_workers - 1)
  return [f"id{i}" for i in range(num_samples)]


@pytest.mark.parametrize("n,workers,shard", [(0, 1, 4), (7, 3, 2), (10, 4, 3), (3, 5, 1)])
def test_layout_covers_every_sample_once_in_order(n, workers, shard):
  layout = F.StoreLayout(n, workers, shard)
  covered = [
    i for w in range(workers) for start, stop in layout.shard_ranges(w) for i in range(start, stop)
  ]
  assert covered == list(range(n))
  assert all(
    stop - start <= shard for w in range(workers) for start, stop in layout.shard_ranges(w)
  )


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_round_trip_in_store_dtype(tmp_path, dtype):
  meta = F.FeatureMeta("enc-a", "tmpl-a", dtype, 8, POLICY)
  ids = write_store(tmp_path, meta)
  reader = F.FeatureReader(str(tmp_path))
  assert reader.meta == meta and reader.ids() == ids and len(reader) == 5
  np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
  for i, sample_id in enumerate(ids):
    got = reader.get(sample_id)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, hidden_for(i).astype(np_dtype).astype(np.float32))
    assert reader.text(sample_id) == f"text {i}"
  again = pickle.loads(pickle.dumps(reader))
  np.testing.assert_array_equal(again.get("id4"), reader.get("id4"))


def test_missing_id_and_incomplete_store_are_named(tmp_path):
  write_store(tmp_path)
  with pytest.raises(F.FeatureError, match="'id99'"):
    F.FeatureReader(str(tmp_path)).get("id99")
  os.remove(tmp_path / store.part_name(1, 2))
  with pytest.raises(F.FeatureError, match="incomplete"):
    F.FeatureReader(str(tmp_path))


def test_check_meta_names_the_mismatch():
  F.check_meta(META, "enc-a", "tmpl-a")
  with pytest.raises(F.FeatureError, match="'enc-a'.*'enc-b'"):
    F.check_meta(META, "enc-b", "tmpl-a")
  with pytest.raises(F.FeatureError, match="'tmpl-a'.*'tmpl-b'"):
    F.check_meta(META, "enc-a", "tmpl-b")


def test_check_encoder_names_where_and_the_width():
  """What a model reads: the encoder and template as check_meta, and its text width."""
  F.check_encoder(META, META, "store")
  with pytest.raises(F.FeatureError, match="store: feature store was encoded by model 'enc-a'"):
    F.check_encoder(META, F.FeatureMeta("enc-b", "tmpl-a", "float32", 8, None), "store")
  wider = F.FeatureMeta("enc-a", "tmpl-a", "bfloat16", 16, POLICY)
  with pytest.raises(F.FeatureError, match=r"store: text features of width 8, the model reads 16"):
    F.check_encoder(META, wider, "store")


def test_writer_refuses_a_store_started_with_other_settings(tmp_path):
  F.FeatureWriter(str(tmp_path), META, F.StoreLayout(5, 2, 2), 0)  # Started, nothing written.
  other = F.FeatureMeta("enc-b", "tmpl-a", "bfloat16", 8, POLICY)
  with pytest.raises(F.FeatureError, match="enc-b"):
    F.FeatureWriter(str(tmp_path), other, F.StoreLayout(5, 2, 2), 0)
  with pytest.raises(F.FeatureError, match="shard_size=3"):
    F.FeatureWriter(str(tmp_path), META, F.StoreLayout(5, 2, 3), 0)
  # Complete, the same rows are done under any layout; other settings are still refused.
  write_store(tmp_path)
  assert F.FeatureWriter(str(tmp_path), META, F.StoreLayout(5, 2, 3), 0).finalize()
  with pytest.raises(F.FeatureError, match="enc-b"):
    F.FeatureWriter(str(tmp_path), other, F.StoreLayout(5, 2, 2), 0)


def test_writer_checks_hidden_size_and_shard_length(tmp_path):
  writer = F.FeatureWriter(str(tmp_path), META, F.StoreLayout(4, 1, 2), 0)
  with pytest.raises(F.FeatureError, match="'id0'.*expected \\(L, 8\\)"):
    writer.write_shard(
      0, [F.FeatureItem("id0", "", np.zeros((2, 4))), F.FeatureItem("id1", "", np.zeros((2, 8)))]
    )
  with pytest.raises(F.FeatureError, match="got 1 items"):
    writer.write_shard(1, [F.FeatureItem("id2", "", np.zeros((2, 8)))])
  assert len(writer.pending_shards()) == 2 and not writer.finalize()


def test_corrupt_record_is_named(tmp_path):
  write_store(tmp_path, num_workers=1, shard_size=5)
  shard = tmp_path / "features-00000-of-00001-00000.array_record"
  writer = ArrayRecordWriter(str(shard), "group_size:1")
  for i in range(5):
    writer.write(
      b"not msgpack"
      if i == 2
      else F.encode_record(F.FeatureItem(f"id{i}", "", hidden_for(i)), "bfloat16")
    )
  writer.close()
  reader = F.FeatureReader(str(tmp_path))
  assert reader.get("id1").shape == (4, 8)
  with pytest.raises(F.FeatureError, match="00000.array_record record 2"):
    reader.get("id2")
