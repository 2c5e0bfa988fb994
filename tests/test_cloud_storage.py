"""gs:// end to end against a real GCS API server on 127.0.0.1 (fake-gcs-server): the file
layer, every store kind, the writers, metrics and TensorBoard events."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from train_config import get_config
from training_data import IMAGE_SIZE, make_stores

from genmask_jax import fileio
from genmask_jax.data import latents, pipeline, records
from genmask_jax.data.features import FeatureError, FeatureReader
from genmask_jax.metric_writer import MetricWriter

ENV = dict(os.environ, PYTHONPATH=".:tests", JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("stores"))
  make_stores(root)
  return root


def test_file_layer_round_trip(bucket, tmp_path):
  fileio.write_json(f"{bucket}/a/x.json", {"k": [1, 2]})
  assert fileio.read_json(f"{bucket}/a/x.json") == {"k": [1, 2]}
  fileio.write_bytes(f"{bucket}/a/r.bin", bytes(range(256)))
  assert fileio.read_range(f"{bucket}/a/r.bin", 10, 5) == bytes(range(10, 15))
  assert fileio.listdir(f"{bucket}/a") == ["r.bin", "x.json"]
  assert fileio.listdir(f"{bucket}/nothing") == [] and not fileio.exists(f"{bucket}/a/y")
  assert fileio.isdir(f"{bucket}/a") and not fileio.isdir(f"{bucket}/a/x.json")
  with pytest.raises(FileNotFoundError, match=f"{bucket}/a/missing.json does not exist"):
    fileio.read_text(f"{bucket}/a/missing.json")
  with pytest.raises(ValueError, match="missing.json does not exist"):
    fileio.read_json(f"{bucket}/a/missing.json")

  (tmp_path / "tree" / "sub").mkdir(parents=True)
  (tmp_path / "tree" / "sub" / "f.txt").write_text("f")
  fileio.upload_tree(str(tmp_path / "tree"), f"{bucket}/tree")
  assert fileio.read_text(f"{bucket}/tree/sub/f.txt") == "f"
  fileio.rmtree(f"{bucket}/tree")
  assert not fileio.exists(f"{bucket}/tree/sub/f.txt")


def test_staged_folder_keeps_every_line_across_flushes_and_resume(bucket):
  """gs:// has no append: lines survive flushes and a reopened (resumed) folder appends."""
  staged = fileio.StagedFolder(f"{bucket}/run", resume=("log.txt",))
  with open(os.path.join(staged.local, "log.txt"), "a") as f:
    f.write("1\n")
  staged.sync()
  with open(os.path.join(staged.local, "log.txt"), "a") as f:
    f.write("2\n")
  staged.close()
  assert fileio.read_text(f"{bucket}/run/log.txt") == "1\n2\n"
  resumed = fileio.StagedFolder(f"{bucket}/run", resume=("log.txt",))
  with open(os.path.join(resumed.local, "log.txt"), "a") as f:
    f.write("3\n")
  resumed.close()
  assert fileio.read_text(f"{bucket}/run/log.txt") == "1\n2\n3\n"


def read_events(path: str) -> list:
  """TensorBoard events of a TFRecord file (length, crc, data, crc per record)."""
  from tensorboardX.proto import event_pb2

  data, events, at = fileio.read_bytes(path), [], 0
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at : at + 8])
    events.append(event_pb2.Event.FromString(data[at + 12 : at + 12 + length]))
    at += 12 + length + 4
  return events


def scalars(events) -> dict[tuple[str, int], float]:
  return {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value}


def test_metric_writer_on_gcs(bucket):
  writer = MetricWriter(f"{bucket}/run", total_steps=4, samples_per_step=2, log_every=2)
  writer.write(1, {"loss": 0.5})
  writer.flush()
  assert fileio.read_text(f"{bucket}/run/metrics.jsonl").count("\n") == 1
  writer.write(2, {"loss": 0.25})
  writer.close()
  writer = MetricWriter(f"{bucket}/run", total_steps=4, samples_per_step=2, log_every=2)
  writer.write(3, {"loss": 0.125})  # A resumed run.
  writer.close()
  lines = fileio.read_text(f"{bucket}/run/metrics.jsonl").splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
  files = fileio.listdir(f"{bucket}/run/tensorboard")
  assert len(files) == 2  # One event file per run.
  events = {}
  for name in files:
    events |= scalars(read_events(f"{bucket}/run/tensorboard/{name}"))
  assert events[("loss", 1)] == 0.5 and events[("loss", 3)] == 0.125


def test_client_library_and_credentials_errors_name_the_path(gcs):
  """Without gcsfs, or without credentials, a gs:// path fails with what to install or set."""
  script = (
    "import sys; sys.modules['gcsfs'] = None\n"
    "from genmask_jax import fileio\n"
    "fileio.read_text('gs://some-bucket/run/x.json')\n"
  )
  env = {k: v for k, v in ENV.items() if k not in gcs.env}
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
  assert "StorageError: gs://some-bucket/run/x.json: reading or writing gs:// needs" in (
    result.stderr
  )
  assert "pip install -r requirements-train.txt" in result.stderr
  script = "from genmask_jax import fileio\nfileio.exists('gs://some-bucket/run/x.json')\n"
  env = dict(
    env, FSSPEC_GCS_TOKEN="google_default", GOOGLE_APPLICATION_CREDENTIALS="/nonexistent.json"
  )
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
  assert "StorageError: gs://some-bucket/run/x.json: access denied or no credentials" in (
    result.stderr
  ), result.stderr[-2000:]
  assert "GOOGLE_APPLICATION_CREDENTIALS" in result.stderr


def upload_stores(root: str, bucket: str) -> str:
  for name in sorted(os.listdir(root)):
    fileio.upload_tree(os.path.join(root, name), f"{bucket}/stores/{name}")
  return f"{bucket}/stores"


def test_every_store_kind_reads_the_same_from_gcs(root, bucket):
  remote = upload_stores(root, bucket)
  for task in ("segmentation", "generation"):
    local_samples = records.RecordReader(os.path.join(root, task))
    remote_samples = records.RecordReader(f"{remote}/{task}")
    assert remote_samples.ids() == local_samples.ids()
    for i in (0, 17, len(local_samples) - 1):
      assert remote_samples[i] == local_samples[i]
    local_features = FeatureReader(os.path.join(root, f"{task}_features"))
    remote_features = FeatureReader(f"{remote}/{task}_features")
    for sample_id in local_samples.ids()[::7]:
      np.testing.assert_array_equal(remote_features.get(sample_id), local_features.get(sample_id))
  # The training pipeline from gs:// gives the same batches as from the local disk.
  local_config, remote_config = get_config(root), get_config(remote)
  local_steps, remote_steps = (
    iter(pipeline.train_dataset(c.data)) for c in (local_config, remote_config)
  )
  for _ in range(2):
    a, b = next(local_steps), next(remote_steps)
    for task in a:
      for key in a[task]:
        np.testing.assert_array_equal(a[task][key], b[task][key], err_msg=f"{task}/{key}")


def pooled(images: np.ndarray) -> np.ndarray:
  """A stand-in VAE encoder: 4x4 average pooling, channels tiled to 16."""
  b, r = images.shape[:2]
  x = images.reshape(b, r // 4, 4, r // 4, 4, 3).mean((2, 4))
  return np.concatenate([x] * 5 + [x[..., :1]], -1)


def test_latent_stores_written_to_and_read_from_gcs(root, bucket, tmp_path):
  store = os.path.join(root, "segmentation")
  kwargs = dict(vae="v", resolution=IMAGE_SIZE, num_workers=2, batch_size=8)
  out = {"local": str(tmp_path / "latents"), "remote": f"{bucket}/latents"}
  # An interrupted run (one worker of two) reads as incomplete, never as a shorter store.
  assert not latents.encode_store(pooled, store, out["remote"], worker_index=1, **kwargs)
  with pytest.raises(latents.LatentError, match=r"incomplete, workers \[0\] of 2"):
    latents.LatentReader(out["remote"])
  assert latents.encode_store(pooled, store, out["remote"], worker_index=0, **kwargs)
  for w in (0, 1):
    latents.encode_store(pooled, store, out["local"], worker_index=w, **kwargs)
  local, remote = latents.LatentReader(out["local"]), latents.LatentReader(out["remote"])
  assert remote.ids() == local.ids()
  for i in range(len(local)):
    for key, value in local[i].items():
      np.testing.assert_array_equal(remote[i][key], value)
  assert not any(fileio.is_temp_name(n) for n in os.listdir(out["local"]))


def test_interrupted_sample_and_feature_writes_read_as_incomplete(root, bucket):
  with pytest.raises(RuntimeError):
    with records.RecordWriter(f"{bucket}/crashed", 4) as writer:
      for sample in records.RecordReader(os.path.join(root, "segmentation")):
        writer.write(sample)
        if sample["id"].endswith("9"):
          raise RuntimeError("converter crashed")
  with pytest.raises(records.RecordError, match="conversion did not finish"):
    records.RecordReader(f"{bucket}/crashed")
  features = os.path.join(root, "segmentation_features")
  remote = f"{bucket}/features"
  for name in os.listdir(features):  # Every shard uploaded, but not the manifest.
    if name != "manifest.json":
      with open(os.path.join(features, name), "rb") as f:
        fileio.write_bytes(f"{remote}/{name}", f.read())
  with pytest.raises(FeatureError, match="no manifest.json, the store is incomplete"):
    FeatureReader(remote)


def test_prepare_data_writes_a_store_to_gcs(gcs, bucket, tmp_path):
  args = ["synthetic", "--num_train=24", "--num_val=8", "--num_heldout=8", "--num_gen=16"]
  command = [sys.executable, "-m", "launch.prepare_data", *args, "--shard_size=10"]
  env = dict(ENV, **gcs.env)
  for output in (str(tmp_path / "data"), f"{bucket}/data"):
    result = subprocess.run(
      command + [f"--output={output}"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
  for split in ("train", "val", "heldout", "gen"):
    local = records.RecordReader(str(tmp_path / "data" / split))
    remote = records.RecordReader(f"{bucket}/data/{split}")
    assert len(remote) == len(local) and list(remote) == list(local)
  result = subprocess.run(
    command + [f"--output={bucket}/data"], env=env, capture_output=True, text=True
  )
  assert result.returncode != 0 and "is not empty; pass --overwrite" in result.stderr
