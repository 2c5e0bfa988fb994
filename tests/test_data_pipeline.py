"""grain pipelines: the join with features, resizing, 1:1 task mixing, resumption, sharding.

Feature stores are written with the feature store's own writer; each sample's hidden states
hold its record index in column 0, so a batch shows which samples it was built from.
"""

import cv2
import grain
import numpy as np
import pytest

from configs import data
from genmask_jax.data import pipeline, preprocess, records, synthetic
from genmask_jax.data.features import (
  FeatureError,
  FeatureItem,
  FeatureMeta,
  FeatureWriter,
  StoreLayout,
)
from genmask_jax.vlm import image_policy
from genmask_jax.vlm.prompts import prompt_template

POLICY = image_policy.DEFAULT.to_record()  # Every feature store records one.

MODEL = "tiny-qwen"
HIDDEN = 8
TEXT_LEN = 8


def _seg_samples(n: int) -> list[dict]:
  """Segmentation samples of varied, non-square sizes with a rectangular target."""
  out = []
  for i in range(n):
    h, w = (20 + 3 * i, 40 - i) if i % 2 else (36 - i, 18 + 2 * i)
    rng = np.random.default_rng(i)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : h // 2, w // 3 : w - 2] = 1
    mask[0, 0] = 255
    out.append(
      records.make_sample(
        sample_id=f"seg/{i}",
        task="segmentation",
        image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        mask=mask,
        text=f"target {i}",
        source={"index": i},
      )
    )
  return out


def _store(path, samples, shard_size=5):
  with records.RecordWriter(str(path), shard_size) as writer:
    for s in samples:
      writer.write(s)
  return str(path)


def _features(path, store, model=MODEL, template=None, lengths=None, ids=None, marker=0.5):
  reader = records.RecordReader(store)
  ids = ids or reader.ids()
  meta = FeatureMeta(model, template or prompt_template(), "float16", HIDDEN, POLICY)
  writer = FeatureWriter(str(path), meta, StoreLayout(len(ids), 1, 4), 0)
  for shard, start, stop in writer.pending_shards():
    items = []
    for i in range(start, stop):
      length = lengths[i] if lengths else 1 + i % TEXT_LEN
      hidden = np.full((length, HIDDEN), marker, np.float32)
      hidden[:, 0] = i
      items.append(FeatureItem(ids[i], f"text {i}", hidden))
    writer.write_shard(shard, items)
  assert writer.finalize()
  return str(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
  root = tmp_path_factory.mktemp("stores")
  seg = _store(root / "seg", _seg_samples(12))
  gen = _store(root / "gen", synthetic.samples("gen", 10, image_size=48))
  return {
    "seg": seg,
    "seg_features": _features(root / "seg_features", seg),
    "gen": gen,
    "gen_features": _features(root / "gen_features", gen),
  }


def _config(stores, **overrides):
  cfg = data.default_config()
  cfg.encoder_model_id = MODEL
  cfg.text_len = TEXT_LEN
  cfg.num_threads = 2
  cfg.prefetch_buffer_size = 4
  cfg.segmentation.sources = [{"records": stores["seg"], "features": stores["seg_features"]}]
  cfg.segmentation.resolution = 32
  cfg.segmentation.global_batch_size = 3
  cfg.generation.sources = [{"records": stores["gen"], "features": stores["gen_features"]}]
  cfg.generation.resolution = 24
  cfg.generation.global_batch_size = 3
  cfg.update(overrides)
  return cfg


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for task in a:
    for key in a[task]:
      np.testing.assert_array_equal(a[task][key], b[task][key], err_msg=f"{task}/{key}")


def test_steps_mix_tasks_one_to_one_and_join_features(stores):
  seg_reader = records.RecordReader(stores["seg"])
  (step,) = _take(iter(pipeline.train_dataset(_config(stores), grain.sharding.NoSharding())), 1)
  seg, gen = step["segmentation"], step["generation"]
  assert seg["image"].shape == (3, 32, 32, 3) and gen["image"].shape == (3, 24, 24, 3)
  assert seg["mask"].shape == (3, 32, 32) and "mask" not in gen
  assert seg["text"].shape == gen["text"].shape == (3, TEXT_LEN, HIDDEN)
  assert seg["image"].dtype == np.float32 and seg["mask"].dtype == np.uint8
  assert seg["text_mask"].dtype == bool and seg["size"].dtype == np.int32
  for batch in (seg, gen):
    assert -1 <= batch["image"].min() and batch["image"].max() <= 1
    for b in range(3):
      i = int(batch["text"][b, 0, 0])  # The record index, from the features.
      length = 1 + i % TEXT_LEN
      np.testing.assert_array_equal(batch["text_mask"][b], np.arange(TEXT_LEN) < length)
      assert (batch["text"][b, :length, 1] == 0.5).all() and (batch["text"][b, length:] == 0).all()
  for b in range(3):  # The image and mask are those of the sample the features belong to.
    sample = seg_reader[int(seg["text"][b, 0, 0])]
    example = preprocess.example(
      {"sample": sample, "hidden": np.zeros((1, HIDDEN))},
      resolution=32,
      text_len=TEXT_LEN,
      text_dtype="float32",
    )
    np.testing.assert_array_equal(seg["image"][b], example["image"])
    np.testing.assert_array_equal(seg["mask"][b], example["mask"])
    assert tuple(seg["size"][b]) == (sample["height"], sample["width"])


def test_resize_pad_and_undo():
  (sample,) = _seg_samples(1)  # 36 x 18: taller than wide.
  hidden = np.ones((3, HIDDEN), np.float32)
  example = preprocess.example(
    {"sample": sample, "hidden": hidden}, resolution=32, text_len=5, text_dtype="bfloat16"
  )
  assert tuple(example["size"]) == (36, 18) and tuple(example["resized_size"]) == (32, 16)
  image = records.decode_image(sample)
  resized = cv2.resize(image, (16, 32), interpolation=cv2.INTER_AREA) / 127.5 - 1
  np.testing.assert_allclose(example["image"][:, :16], resized, atol=1e-6)
  assert (example["image"][:, 16:] == -1).all() and (example["mask"][:, 16:] == 0).all()
  assert set(np.unique(example["mask"])) <= {0, 1, 255}
  undone = cv2.resize(example["mask"][:32, :16], (18, 36), interpolation=cv2.INTER_NEAREST)
  truth = records.decode_mask(sample)
  assert np.mean(undone == truth) > 0.95
  assert example["text"].dtype.name == "bfloat16" and example["text_mask"].tolist() == [
    True,
    True,
    True,
    False,
    False,
  ]


def test_resuming_from_a_saved_state_gives_the_same_batches(stores):
  cfg = _config(stores, seed=3)
  uninterrupted = _take(iter(pipeline.train_dataset(cfg, grain.sharding.NoSharding())), 7)
  first = iter(pipeline.train_dataset(cfg, grain.sharding.NoSharding()))
  _take(first, 4)  # Past the end of the first segmentation epoch (12 samples / 3).
  state = first.get_state()
  resumed = iter(pipeline.train_dataset(cfg, grain.sharding.NoSharding()))
  resumed.set_state(state)
  for a, b in zip(_take(resumed, 3), uninterrupted[4:], strict=True):
    _assert_same(a, b)
  # Epochs are reshuffled, and another seed gives another order.
  order = [int(i) for step in uninterrupted for i in step["segmentation"]["text"][:, 0, 0]]
  assert sorted(order[:12]) == list(range(12)) and order[:12] != order[12:24]
  other = _take(
    iter(pipeline.train_dataset(_config(stores, seed=4), grain.sharding.NoSharding())), 4
  )
  assert [int(i) for s in other for i in s["segmentation"]["text"][:, 0, 0]] != order[:12]


def _global_batches(stores, processes: int, steps: int, size: int = 4) -> list[dict]:
  """The first `steps` steps of every process, each process's slices joined in order."""
  per_process = [
    _take(iter(pipeline.train_dataset(_config_4(stores, size), _shard(i, processes))), steps)
    for i in range(processes)
  ]
  return [
    {
      task: {
        k: np.concatenate([p[t][task][k] for p in per_process]) for k in per_process[0][t][task]
      }
      for task in per_process[0][t]
    }
    for t in range(steps)
  ]


def _config_4(stores, size: int = 4):
  """Global batches of `size` per task."""
  cfg = _config(stores)
  cfg.segmentation.global_batch_size = cfg.generation.global_batch_size = size
  return cfg


def _shard(index: int, count: int) -> grain.sharding.ShardOptions:
  return grain.sharding.ShardOptions(shard_index=index, shard_count=count)


def test_global_batches_do_not_depend_on_the_number_of_processes(stores):
  one = _global_batches(stores, 1, 3)  # One epoch of the 12 segmentation samples.
  assert [len(step["segmentation"]["text"]) for step in one] == [4, 4, 4]
  seen = [int(i) for step in one for i in step["segmentation"]["text"][:, 0, 0]]
  assert sorted(seen) == list(range(12))
  for processes in (2, 4):
    for a, b in zip(one, _global_batches(stores, processes, 3), strict=True):
      _assert_same(a, b)
  one = _global_batches(stores, 1, 3, size=8)  # Across the epoch boundary.
  for processes in (2, 8):
    for a, b in zip(one, _global_batches(stores, processes, 3, size=8), strict=True):
      _assert_same(a, b)


def test_a_process_reads_only_its_slice(stores):
  """Process i's examples are rows [2i, 2i + 2) of each global batch of 4, and no others."""
  one = _global_batches(stores, 1, 3)
  for index in (0, 1):
    steps = _take(iter(pipeline.train_dataset(_config_4(stores), _shard(index, 2))), 3)
    for step, whole in zip(steps, one, strict=True):
      rows = slice(2 * index, 2 * index + 2)
      np.testing.assert_array_equal(
        step["segmentation"]["text"], whole["segmentation"]["text"][rows]
      )

  indices, batches = [], []
  for index in (0, 1):
    shard = grain.sharding.ShardOptions(shard_index=index, shard_count=2)
    ds = pipeline.eval_dataset(
      _config(stores), stores["seg"], stores["seg_features"], batch_size=5, shard=shard
    )
    steps = list(ds)
    batches.append(len(steps))
    valid = np.concatenate([s["valid"] for s in steps])
    indices.append(np.concatenate([s["index"] for s in steps])[valid].tolist())
    assert valid.sum() == 6 and not valid[6:].any()  # Padding comes last, marked invalid.
  assert batches == [2, 2]  # Every process runs the same number of steps.
  assert not set(indices[0]) & set(indices[1]) and sorted(indices[0] + indices[1]) == list(
    range(12)
  )


def test_feature_mismatches_are_errors_naming_the_store_or_sample(stores, tmp_path):
  ids = records.RecordReader(stores["seg"]).ids()
  cases = [
    (dict(ids=ids[:5] + ["seg/other"] + ids[6:]), "no features for sample 'seg/5'"),
    (  # Both ways out: re-encode, or declare the store's encoder the intended one.
      dict(model="another-vlm"),
      "encoded by model 'another-vlm', expected 'tiny-qwen': re-run launch/precompute_vlm.py "
      "with 'tiny-qwen', or, .* set --config.data.encoder_model_id=another-vlm",
    ),
    (dict(template="Segment {target}."), "prompt template 'Segment {target}.'"),
  ]
  for k, (kwargs, message) in enumerate(cases):
    features = _features(tmp_path / f"f{k}", stores["seg"], **kwargs)
    cfg = _config(stores)
    cfg.segmentation.sources = [{"records": stores["seg"], "features": features}]
    with pytest.raises(FeatureError, match=message):
      pipeline.train_dataset(cfg, grain.sharding.NoSharding())
  cfg = _config(stores)
  cfg.segmentation.sources = cfg.generation.sources
  with pytest.raises(records.RecordError, match=r"holds \['generation'\] samples"):
    pipeline.train_dataset(cfg, grain.sharding.NoSharding())


def test_bad_samples_fail_naming_the_sample(stores, tmp_path):
  samples = _seg_samples(3)
  ok, png = cv2.imencode(".png", np.zeros((20, 18, 3), np.uint8))
  samples[1] = records.make_sample(
    sample_id="seg/broken",
    task="segmentation",
    image=png.tobytes()[:60],  # The header survives, the pixels do not.
    mask=np.zeros((20, 18), np.uint8),
    text="x",
    source={},
  )
  store = _store(tmp_path / "bad", samples)
  features = _features(tmp_path / "bad_features", store, lengths=[2, 2, TEXT_LEN + 1])
  cfg = _config(stores)
  source = pipeline.JoinedSource(
    store, features, task="segmentation", model_id=MODEL, template=cfg.prompt_template
  )
  prep = dict(resolution=32, text_len=TEXT_LEN, text_dtype="float32")
  preprocess.example(source[0], **prep)
  with pytest.raises(records.RecordError, match="sample 'seg/broken': image does not decode"):
    preprocess.example(source[1], **prep)
  with pytest.raises(FeatureError, match=r"sample 'seg/2': 9 text tokens exceed text_len=8"):
    preprocess.example(source[2], **prep)
  # Inside the grain pipeline the error surfaces with the same message.
  with pytest.raises(Exception, match="seg/broken|seg/2"):
    list(
      pipeline.eval_dataset(cfg, store, features, batch_size=3, shard=grain.sharding.NoSharding())
    )


def test_resuming_with_worker_processes(stores):
  """With workers the order depends on their number; resuming with the same number is exact."""
  cfg = _config(stores, num_workers=2, seed=7)
  first = iter(pipeline.train_dataset(cfg, grain.sharding.NoSharding()))
  epoch = _take(first, 4)
  state = first.get_state()
  rest = _take(first, 3)
  first.close()
  resumed = iter(pipeline.train_dataset(cfg, grain.sharding.NoSharding()))
  resumed.set_state(state)
  again = _take(resumed, 3)
  resumed.close()
  for a, b in zip(again, rest, strict=True):
    _assert_same(a, b)
  order = [int(i) for step in epoch for i in step["segmentation"]["text"][:, 0, 0]]
  assert sorted(order) == list(range(12))


def test_weighted_sources_are_mixed_by_weight(stores, tmp_path):
  other = _store(tmp_path / "other", [dict(s, id="other/" + s["id"]) for s in _seg_samples(5)])
  cfg = _config(stores)
  cfg.segmentation.sources = [
    {"records": stores["seg"], "features": stores["seg_features"], "weight": 3.0},
    {"records": other, "features": _features(tmp_path / "of", other, marker=0.25), "weight": 1.0},
  ]
  steps = _take(iter(pipeline.train_dataset(cfg, grain.sharding.NoSharding())), 20)
  markers = np.concatenate([s["segmentation"]["text"][:, 0, 1] for s in steps])
  assert set(markers.tolist()) == {0.5, 0.25}
  # grain's mix interleaves by proportion, deterministically (no sampling): binomial bounds
  # (4 sigma of 60 draws at 3:1 is +-13) would pass 2:1 (40 of 60) and 4:1 (48 of 60). Every
  # prefix of n samples holds 3n/4 of the first source to within one; measured 45 of 60 and a
  # largest prefix deviation of 0.75 (2:1 gives 40, 4:1 gives 48).
  first = np.cumsum(markers == 0.5)
  n = np.arange(1, len(markers) + 1)
  assert np.abs(first - 0.75 * n).max() < 1, first.tolist()
  cfg.segmentation.sources[1]["weight"] = None
  with pytest.raises(ValueError, match="a weight, or none"):
    pipeline.train_dataset(cfg, grain.sharding.NoSharding())


def _semantic_store(path, classes_per_image: list[int], info=None) -> str:
  """One sample per (image, class): ids sem/train/img{k}/{c}."""
  samples = [
    dict(s, id=f"sem/train/img{k}/{c}")
    for k, n in enumerate(classes_per_image)
    for c, s in zip(range(n), _seg_samples(n), strict=True)
  ]
  with records.RecordWriter(str(path), 4, info=info or {"classes_per_image": 0}) as writer:
    for s in samples:
      writer.write(s)
  return str(path)


def test_semantic_classes_are_drawn_per_use_and_resume_exactly(stores, tmp_path):
  sem = _semantic_store(tmp_path / "sem", [5, 2, 1])  # Rows 0-4: img0, 5-6: img1, 7: img2.
  cfg = _config(stores, seed=1)
  cfg.segmentation.sources = [
    {"records": sem, "features": _features(tmp_path / "sf", sem), "classes_per_use": 2}
  ]
  for task in ("segmentation", "generation"):
    cfg[task].global_batch_size = 5  # One epoch of slots: 2 + 2 + 1.

  def rows(steps):
    return [sorted(int(i) for i in s["segmentation"]["text"][:, 0, 0]) for s in steps]

  epochs = rows(_take(iter(pipeline.train_dataset(cfg, grain.sharding.NoSharding())), 16))
  draws = []
  for epoch in epochs:
    assert epoch[2:] == [5, 6, 7], epoch  # Images with <= 2 classes show all of them.
    assert epoch[0] < epoch[1] <= 4  # Two distinct classes of img0.
    draws.append(tuple(epoch[:2]))
  assert len(set(draws)) > 3 and {r for d in draws for r in d} == {0, 1, 2, 3, 4}
  first = iter(pipeline.train_dataset(cfg, grain.sharding.NoSharding()))
  _take(first, 3)
  resumed = iter(pipeline.train_dataset(cfg, grain.sharding.NoSharding()))
  resumed.set_state(first.get_state())
  assert rows(_take(resumed, 5)) == epochs[3:8]
  cfg.seed = 2
  assert rows(_take(iter(pipeline.train_dataset(cfg, grain.sharding.NoSharding())), 16)) != epochs


def test_class_draws_need_every_class_in_image_class_ids_and_sources_known_keys(stores, tmp_path):
  cfg = _config(stores)
  drawn = _semantic_store(tmp_path / "drawn", [2], info={"classes_per_image": 3})
  flat = _store(tmp_path / "flat", [dict(s, id=f"s{i}") for i, s in enumerate(_seg_samples(2))])
  for name, store_dir, error in [
    ("drawn", drawn, r"drawn: converted with classes_per_image=3 .*--classes_per_image=0"),
    ("flat", flat, r"flat: sample 's0' is not IMAGE/CLASS"),
  ]:
    features = _features(tmp_path / f"{name}_features", store_dir)
    cfg.segmentation.sources = [{"records": store_dir, "features": features, "classes_per_use": 3}]
    with pytest.raises(FeatureError, match=error):
      pipeline.train_dataset(cfg, grain.sharding.NoSharding())
  typo = {"records": stores["seg"], "features": stores["seg_features"], "wieght": 1.0}
  cfg.segmentation.sources = [typo]
  keys = r"sources\[0\] has keys \['features', 'records', 'wieght'\]"
  with pytest.raises(ValueError, match=keys):
    pipeline.train_dataset(cfg, grain.sharding.NoSharding())
