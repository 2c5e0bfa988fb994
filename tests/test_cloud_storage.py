"""gs:// end to end against a real GCS API server on 127.0.0.1 (fake-gcs-server): the file
layer, every store kind, the writers, metrics and TensorBoard events."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import fake_devices
from processes import free_port
from test_train import final_params
from train_config import get_config
from training_data import IMAGE_SIZE, make_stores

from genmask_jax.data import encode_latents, latents, pipeline, records
from genmask_jax.data.features import FeatureError, FeatureReader
from genmask_jax.runtime import fileio
from genmask_jax.training.metric_writer import MetricWriter

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


def test_listings_see_objects_written_by_other_processes(gcs, bucket):
  """A process polling a run (checkpoints, other hosts' shards) sees new objects: gcsfs's
  listing cache is off (with it, Orbax restored a stale step)."""
  fileio.write_text(f"{bucket}/run/1", "")
  assert fileio.listdir(f"{bucket}/run") == ["1"]
  script = f"from genmask_jax.runtime import fileio; fileio.write_text('{bucket}/run/2', '')"
  subprocess.run([sys.executable, "-c", script], env=dict(ENV, **gcs.env), check=True)
  assert fileio.listdir(f"{bucket}/run") == ["1", "2"]


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
  writer.write_eval(2, {"val": {"Prec@0.5": 0.75}})
  writer.close()
  writer = MetricWriter(f"{bucket}/run", total_steps=4, samples_per_step=2, log_every=2)
  writer.write(3, {"loss": 0.125})  # A resumed run.
  writer.close()
  lines = fileio.read_text(f"{bucket}/run/metrics.jsonl").splitlines()
  rows = [json.loads(line) for line in lines]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
  assert [r for r in rows if "loss" not in r] == [{"eval/val/Prec@0.5": 0.75, "step": 2}]
  files = fileio.listdir(f"{bucket}/run/tensorboard")
  assert len(files) == 2  # One event file per run.
  events = {}
  for name in files:
    events |= scalars(read_events(f"{bucket}/run/tensorboard/{name}"))
  assert events[("loss", 1)] == 0.5 and events[("loss", 3)] == 0.125
  assert events[("eval/val/Prec_at_0.5", 2)] == 0.75  # A name TensorBoard accepts.


def test_client_library_and_credentials_errors_name_the_path(gcs):
  """Without gcsfs, or without credentials, a gs:// path fails with what to install or set."""
  script = (
    "import sys; sys.modules['gcsfs'] = None\n"
    "from genmask_jax.runtime import fileio\n"
    "fileio.read_text('gs://some-bucket/run/x.json')\n"
  )
  env = {k: v for k, v in ENV.items() if k not in gcs.env}
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
  assert "StorageError: gs://some-bucket/run/x.json: reading or writing gs:// needs" in (
    result.stderr
  )
  assert "pip install -r requirements-train.txt" in result.stderr
  script = "from genmask_jax.runtime import fileio\nfileio.exists('gs://some-bucket/run/x.json')\n"
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


def test_sample_and_feature_stores_written_to_gcs(root, bucket):
  """The writers themselves on gs:// (shards staged locally, uploaded whole, metadata last)."""
  remote = f"{bucket}/written"
  make_stores(remote)
  for task in ("segmentation", "generation"):
    assert list(records.RecordReader(f"{remote}/{task}")) == list(
      records.RecordReader(os.path.join(root, task))
    )
    local, written = (FeatureReader(f"{r}/{task}_features") for r in (root, remote))
    assert written.ids() == local.ids()
    for sample_id in local.ids():
      np.testing.assert_array_equal(written.get(sample_id), local.get(sample_id))
  assert not [n for n in fileio.listdir(f"{remote}/segmentation") if fileio.is_temp_name(n)]


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
  assert not encode_latents.encode_store(pooled, store, out["remote"], worker_index=1, **kwargs)
  with pytest.raises(latents.LatentError, match=r"incomplete, workers \[0\] of 2"):
    latents.LatentReader(out["remote"])
  assert encode_latents.encode_store(pooled, store, out["remote"], worker_index=0, **kwargs)
  for w in (0, 1):
    encode_latents.encode_store(pooled, store, out["local"], worker_index=w, **kwargs)
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
  for name in os.listdir(features):  # Every shard uploaded, but not the workers' parts.
    if not name.startswith("part-"):
      with open(os.path.join(features, name), "rb") as f:
        fileio.write_bytes(f"{remote}/{name}", f.read())
  with pytest.raises(FeatureError, match=r"incomplete, workers \[0\] of 1"):
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
  assert result.returncode != 0 and "holds finished stores" in result.stderr


def pod_command(root: str, workdir: str, process_id: int, port: int, *flags: str) -> list[str]:
  """One process of a 2-process x 4-fake-device job (mesh data=2, fsdp=4)."""
  return [
    sys.executable, "-m", "genmask_jax.main", f"--config=tests/train_config.py:{root}",
    f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
    f"--process_id={process_id}", "--config.mesh.data=2", "--config.mesh.fsdp=4",
    "--config.eval.every_steps=8", *flags,
  ]  # fmt: skip


class Job:
  """The processes of one multi-process run; every one is killed on exit."""

  def __init__(self, root: str, workdir: str, env: dict):
    port = free_port()
    self.processes = [
      subprocess.Popen(
        pod_command(root, workdir, i, port),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
      )
      for i in range(2)
    ]

  def wait(self) -> None:
    for p in self.processes:
      _, err = p.communicate(timeout=900)
      assert p.returncode == 0, err[-3000:]

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    for p in self.processes:
      if p.poll() is None:
        p.kill()
      p.communicate()


def committed_steps(workdir: str) -> list[int]:
  directory = f"{workdir}/checkpoints"
  return sorted(
    int(n)
    for n in fileio.listdir(directory)
    if n.isdigit() and fileio.exists(f"{directory}/{n}/commit_success.txt")
  )


def metric_rows(workdir: str) -> list[dict]:
  return [json.loads(line) for line in fileio.read_text(f"{workdir}/metrics.jsonl").splitlines()]


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")
def test_pod_job_on_gcs_resumes_after_sigkill(root, gcs, bucket, tmp_path):
  """The pod path: stores and work directory on gs://, 2 processes x 4 fake devices; one process
  is SIGKILLed after a checkpoint, both restart; the result equals an uninterrupted local run."""
  env = dict(ENV, **gcs.env, XLA_FLAGS=fake_devices(4), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  local_run = str(tmp_path / "local")
  with Job(root, local_run, env) as job:
    job.wait()

  remote_root, run = upload_stores(root, bucket), f"{bucket}/run"
  with Job(remote_root, run, env) as job:
    while not committed_steps(run):
      assert all(p.poll() is None for p in job.processes), "the run ended before the kill"
      time.sleep(0.2)
    job.processes[1].send_signal(signal.SIGKILL)
    assert job.processes[1].wait() == -signal.SIGKILL
  killed_at = committed_steps(run)
  assert 8 not in killed_at
  with Job(remote_root, run, env) as job:  # The same command, both processes.
    job.wait()

  # Every step's loss equals the uninterrupted run's; metrics.jsonl holds each step once per
  # attempt: the first attempt's steps up to (at least) its last checkpoint, published when it
  # was saved, then the second attempt's from that checkpoint on.
  rows = [r for r in metric_rows(run) if "loss" in r]
  steps = [r["step"] for r in rows]
  restarts = [i for i in range(1, len(steps)) if steps[i] != steps[i - 1] + 1]
  assert len(restarts) <= 1 and steps[0] == 1 and steps[-1] == 8, steps
  if restarts:
    assert steps[restarts[0]] == max(killed_at) + 1 <= steps[restarts[0] - 1] + 1, steps
  else:
    assert steps == list(range(1, 9))
  reference = {r["step"]: r["loss"] for r in metric_rows(local_run) if "loss" in r}
  assert {r["step"]: r["loss"] for r in rows} == reference
  config = get_config(root)
  config.mesh = dict(data=2, fsdp=4, tensor=1)
  jax.tree.map(
    np.testing.assert_array_equal, final_params(run, config), final_params(local_run, config)
  )
  events = {}
  for name in fileio.listdir(f"{run}/tensorboard"):
    events |= scalars(read_events(f"{run}/tensorboard/{name}"))
  assert {s for (tag, s) in events if tag == "loss"} == set(range(1, 9))

  # --mode=eval (one process here) and predict read the run from the bucket and write there.
  env1 = dict(ENV, **gcs.env, XLA_FLAGS=fake_devices(8))
  config_flag = f"--config=tests/train_config.py:{remote_root}"
  command = [sys.executable, "-m", "genmask_jax.main", config_flag, f"--workdir={run}"]
  result = subprocess.run(command + ["--mode=eval"], env=env1, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  during_training = fileio.read_json(f"{run}/eval/step_8/results.json")
  after_training = fileio.read_json(f"{run}/eval/results.json")
  assert after_training.keys() == during_training.keys() == {"synthetic_train"}
  for split, metrics in during_training.items():
    assert after_training[split] == pytest.approx(metrics, abs=1e-6)
  assert fileio.exists(f"{run}/eval/synthetic_train_overlays.png")
  ids = records.RecordReader(os.path.join(root, "segmentation")).ids()[:3]
  masks = {}
  for name, workdir, stores in (("gcs", run, remote_root), ("local", local_run, root)):
    out = f"{bucket}/predict_{name}"
    command = [
      sys.executable, "-m", "launch.predict", f"--config=tests/train_config.py:{stores}",
      f"--workdir={workdir}", f"--records={stores}/segmentation",
      f"--features={stores}/segmentation_features", f"--out={out}",
      *[f"--sample_id={i}" for i in ids],
    ]  # fmt: skip
    result = subprocess.run(command, env=env1, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    masks[name] = {n: fileio.read_bytes(f"{out}/{n}") for n in fileio.listdir(out)}
  assert len(masks["gcs"]) == 6 and masks["gcs"] == masks["local"]


def test_converted_weights_written_to_and_restored_from_gcs(gcs, bucket, tmp_path):
  from safetensors.numpy import save_file
  from test_dit import setup

  from genmask_jax.conversion import weights
  from genmask_jax.conversion.dit import convert_dit_file

  config, _, state = setup()
  source = str(tmp_path / "diffusion_pytorch_model.safetensors")
  save_file(state, source)
  out = f"{bucket}/wan21_init"
  command = [sys.executable, "-m", "launch.convert_wan", "--config=configs/genmask.py:tiny"]
  result = subprocess.run(
    command + [f"--dit={source}", f"--out={out}"],
    env=dict(ENV, **gcs.env),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert weights.read_record(out)["sources"] == {"dit": source}
  expected, _ = convert_dit_file(source, config)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), expected)
  restored = weights.restore(out, "dit", target)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored, expected)
