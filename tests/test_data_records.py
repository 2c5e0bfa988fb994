"""The sample store: round trips, random access by index and id, and clear errors."""

import os
import pickle

import cv2
import msgpack
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from genmask_jax.data import records, store


def _sample(i: int, task: str = "segmentation", size=(24, 32)) -> dict:
  rng = np.random.default_rng(i)
  image = rng.integers(0, 256, size + (3,), dtype=np.uint8)
  mask = (
    rng.choice(np.array(records.MASK_VALUES, np.uint8), size) if task == "segmentation" else None
  )
  return records.make_sample(
    sample_id=f"set/{i}",
    task=task,
    image=image,
    mask=mask,
    text=f"thing {i}",
    source={"dataset": "set", "index": i, "nested": [1, None, "x"]},
  )


def _write(path, samples, shard_size=3):
  with records.RecordWriter(str(path), shard_size, info={"by": "test"}) as writer:
    for s in samples:
      writer.write(s)


def test_round_trip_by_index_and_id(tmp_path):
  samples = [_sample(i) for i in range(7)] + [_sample(7, "generation")]
  _write(tmp_path, samples)
  reader = records.RecordReader(str(tmp_path))
  assert len(reader) == 8 and reader.ids() == [s["id"] for s in samples]
  assert [len(s.ids) for s in reader.shards] == [3, 3, 2]
  assert reader.meta.tasks == {"segmentation": 7, "generation": 1}
  assert reader.meta.info == {"by": "test"}
  assert [reader[i] for i in range(8)] == samples
  assert reader.get("set/4") == samples[4] and reader.index_of("set/5") == 5
  # Decoding gives back the arrays, at the original resolution.
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(records.decode_image(reader[4]), image)
  mask = rng.choice(np.array(records.MASK_VALUES, np.uint8), (24, 32))
  np.testing.assert_array_equal(records.decode_mask(reader[4]), mask)
  assert reader[7]["mask"] is None
  # Picklable for grain workers, also after shards were opened.
  clone = pickle.loads(pickle.dumps(reader))
  assert clone[6] == samples[6]
  with pytest.raises(records.RecordError, match="no sample with id 'set/99'"):
    reader.get("set/99")
  with pytest.raises(IndexError):
    reader[8]


def test_encoded_images_are_kept_as_stored():
  ok, jpeg = cv2.imencode(".jpg", np.full((10, 20, 3), 90, np.uint8))
  sample = records.make_sample(
    sample_id="a", task="generation", image=jpeg.tobytes(), text="grey", source={}
  )
  assert sample["image"] == jpeg.tobytes() and sample["image_format"] == "jpeg"
  assert (sample["height"], sample["width"]) == (10, 20)


def test_invalid_samples_are_refused():
  image = np.zeros((8, 8, 3), np.uint8)
  with pytest.raises(records.RecordError, match=r"sample 'a'.*mask values \[2\]"):
    records.make_sample(
      sample_id="a", task="segmentation", image=image, mask=np.full((8, 8), 2), text="", source={}
    )
  with pytest.raises(records.RecordError, match=r"sample 'b'.*mask shape \(8, 9\)"):
    records.make_sample(
      sample_id="b", task="segmentation", image=image, mask=np.zeros((8, 9)), text="", source={}
    )
  with pytest.raises(records.RecordError, match="sample 'c': a segmentation sample needs a mask"):
    records.make_sample(sample_id="c", task="segmentation", image=image, text="", source={})
  with pytest.raises(records.RecordError, match="sample 'd': unreadable image"):
    records.make_sample(sample_id="d", task="generation", image=b"GIF89a...", text="", source={})


def test_corrupt_records_name_shard_and_index(tmp_path):
  _write(tmp_path, [_sample(i) for i in range(5)])
  # A record that is not msgpack, written in place of record 1 of shard 1.
  shard = tmp_path / "records-00000-of-00001-00001.array_record"
  writer = ArrayRecordWriter(str(shard), "group_size:1,uncompressed")
  writer.write(records.encode_sample(_sample(3)))
  writer.write(b"\xc1 not msgpack")
  writer.close()
  reader = records.RecordReader(str(tmp_path))
  assert reader[3]["id"] == "set/3"
  with pytest.raises(
    records.RecordError, match=r"records-00000-of-00001-00001.array_record record 1: not a msgpack"
  ):
    reader[4]
  # A flipped byte inside a record: Riegeli's checksum catches it.
  first = tmp_path / "records-00000-of-00001-00000.array_record"
  data = bytearray(first.read_bytes())
  data[data.index(b"thing 1")] ^= 0xFF
  first.write_bytes(bytes(data))
  reader = records.RecordReader(str(tmp_path))
  assert reader[0]["id"] == "set/0"
  with pytest.raises(records.RecordError, match=r"00001-00000.array_record record 1: unreadable"):
    reader[1]


def test_malformed_fields_and_versions(tmp_path):
  good = _sample(0)
  for broken, message in [
    ({**good, "format_version": 99}, "format version 99"),
    ({**good, "task": "detection"}, "task 'detection'"),
    ({k: v for k, v in good.items() if k != "text"}, "field 'text' missing"),
    ({**good, "mask": None}, "with mask"),
  ]:
    with pytest.raises(records.RecordError, match=f"shard-x record 0: .*{message}"):
      records.decode_sample(msgpack.packb(broken, use_bin_type=True), "shard-x record 0")


def test_unreadable_image_names_the_sample():
  sample = _sample(0)
  sample["image"] = sample["image"][:60]  # The header survives, the pixels do not.
  with pytest.raises(records.RecordError, match="sample 'set/0': image does not decode"):
    records.decode_image(sample)


def test_writer_refuses_to_overwrite_and_incomplete_stores(tmp_path):
  _write(tmp_path / "a", [_sample(0)])
  with pytest.raises(FileExistsError, match="--overwrite"):
    records.RecordWriter(str(tmp_path / "a"), 10)
  with records.RecordWriter(str(tmp_path / "a"), 10, overwrite=True) as writer:
    writer.write(_sample(1))
  assert records.RecordReader(str(tmp_path / "a")).ids() == ["set/1"]
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="notes.txt"):
    records.RecordWriter(str(tmp_path / "b"), 10, overwrite=True)
  # A conversion that fails midway leaves its finished shards, drops the unfinished one and
  # writes neither store.json nor its part: the store reads as unfinished.
  with pytest.raises(RuntimeError):
    with records.RecordWriter(str(tmp_path / "c"), 1) as writer:
      writer.write(_sample(0))
      writer.write(_sample(1))
      raise RuntimeError("converter crashed")
  assert sorted(os.listdir(tmp_path / "c")) == [
    "records-00000-of-00001-00000.array_record",
    "records-00000-of-00001-00000.ids.json",
  ]
  assert not store.is_complete(str(tmp_path / "c"))
  with pytest.raises(records.RecordError, match="did not finish"):
    records.RecordReader(str(tmp_path / "c"))
  with pytest.raises(records.RecordError, match="'set/0' written twice"):
    with records.RecordWriter(str(tmp_path / "d"), 10) as writer:
      writer.write(_sample(0))
      writer.write(_sample(0))


def test_query_samples_from_files_arrays_and_pil_images(tmp_path):
  """A caller's images become segmentation records without ground truth (all ignore) at the
  image's own size; files keep their bytes and path, arrays and PIL images are stored as PNG."""
  wide = np.random.default_rng(0).integers(0, 256, (20, 36, 3), dtype=np.uint8)
  path = str(tmp_path / "wide.png")
  cv2.imwrite(path, wide[..., ::-1])
  tall = Image.fromarray(wide.transpose(1, 0, 2))
  samples = records.query_samples([path, wide, tall], ["a", "b", "c"])
  assert [s["id"] for s in samples] == [path, "image-1", "image-2"]
  assert [s["text"] for s in samples] == ["a", "b", "c"]
  assert samples[0]["image"] == open(path, "rb").read()
  assert samples[0]["source"] == {"path": path}
  for sample, image in zip(samples, [wide, wide, np.asarray(tall)], strict=True):
    np.testing.assert_array_equal(records.decode_image(sample), image)
    mask = records.decode_mask(sample)
    assert mask.shape == image.shape[:2] and (mask == 255).all()


def test_query_samples_refuse_bad_images_naming_them(tmp_path):
  text_file = tmp_path / "notes.png"
  text_file.write_text("not an image")
  with pytest.raises(store.StoreError, match=f"{text_file}: not a readable JPEG or PNG"):
    records.query_samples([str(text_file)], ["a"])
  with pytest.raises(store.StoreError, match=r"image 1: expected an \(H, W, 3\) uint8 array"):
    records.query_samples([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)], ["a", "b"])
  with pytest.raises(store.StoreError, match="one text per image: got 1 images, 2 texts"):
    records.query_samples([np.zeros((4, 4, 3), np.uint8)], ["a", "b"])


def test_caption_samples_and_store_samples_by_task(tmp_path):
  captions = records.caption_samples(["a red bus", "a cat"])
  assert [(s["id"], s["task"], s["text"]) for s in captions] == [
    ("prompt-0", "generation", "a red bus"),
    ("prompt-1", "generation", "a cat"),
  ]
  _write(tmp_path, [_sample(0), _sample(1, "generation"), _sample(2)])
  reader = records.RecordReader(str(tmp_path))
  assert [s["id"] for s in reader.get_all(["set/2", "set/0"], "segmentation")] == ["set/2", "set/0"]
  with pytest.raises(store.StoreError, match="'set/1' is a generation sample, expected segm"):
    reader.get_all(["set/0", "set/1"], "segmentation")
