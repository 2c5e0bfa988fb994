"""One command per node for the VLM stage (launch/precompute_vlm.py --gpus=cpu:N,
launch/common/fanout.py): the same store as one worker, a killed worker finished by a re-run,
files readable by others."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from genmask_jax.data import features as F
from genmask_jax.data import records, store
from genmask_jax.vlm import image_policy, prompts, tiny_qwen
from launch.common import fanout

# 8 samples, shards of 2, batches of 2: the two workers' slices [0, 4) and [4, 8) start on shard
# boundaries of the one-worker layout, so every batch, hence every stored byte, is the same.
# (Where a worker boundary splits a batch, the samples of that batch are encoded in other batches,
# and their features may differ by float rounding: ~1e-6 in float32 on this CPU.)
NUM_SAMPLES = 8
TEXTS = ["red cat", "A photo of a dog.", "blue car on the left", "man", "A bus.", "what can fly?"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return tiny_qwen.save_tiny_qwen(str(tmp_path_factory.mktemp("tiny_qwen")), seed=0)


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("samples"))
  rng = np.random.default_rng(1)
  with records.RecordWriter(path, shard_size=4) as writer:
    for i in range(NUM_SAMPLES):
      task = "generation" if i % 3 == 1 else "segmentation"
      image = rng.integers(0, 256, (56 + 28 * (i % 2), 56, 3), dtype=np.uint8)
      mask = (
        (rng.random(image.shape[:2]) > 0.5).astype(np.uint8) if task == "segmentation" else None
      )
      text = TEXTS[i % len(TEXTS)]
      writer.write(
        records.make_sample(
          sample_id=f"s{i}", task=task, image=image, text=text, source={}, mask=mask
        )
      )
  return path


def precompute(checkpoint, samples, out, *flags, pythonpath=None) -> subprocess.CompletedProcess:
  """Runs launch/precompute_vlm.py to the end; on any error its whole process group is killed."""
  command = [sys.executable, "-m", "launch.precompute_vlm", f"--checkpoint={checkpoint}"]
  command += [f"--samples={samples}", f"--out={out}", "--model_id=tiny-qwen"]
  command += ["--batch_size=2", "--shard_size=2", *flags]
  env = dict(os.environ, OMP_NUM_THREADS="1")
  if pythonpath:
    env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
  process = subprocess.Popen(
    command,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  try:
    stdout, stderr = process.communicate(timeout=600)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)  # The fan-out's workers share its group.
      process.wait()
  return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def shards_by_ids(path) -> dict[tuple[str, ...], bytes]:
  """Each shard file's bytes, keyed by the sample ids it holds (names carry the worker count)."""
  shards = F.FeatureReader(str(path)).shards
  return {tuple(s.ids): (path / s.files["features"]).read_bytes() for s in shards}


def store_files(path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def one_worker(checkpoint, sample_store, tmp_path_factory):
  out = tmp_path_factory.mktemp("one") / "features"
  result = precompute(checkpoint, sample_store, out)
  assert result.returncode == 0, result.stderr[-3000:]
  return out


@pytest.fixture(scope="module")
def two_workers(checkpoint, sample_store, tmp_path_factory):
  root = tmp_path_factory.mktemp("two")
  result = precompute(
    checkpoint, sample_store, root / "features", "--gpus=cpu:2", f"--worker_logs={root / 'logs'}"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "precompute_vlm: 100%" in result.stderr and f"{NUM_SAMPLES}/{NUM_SAMPLES}" in result.stderr
  return root


def test_two_workers_write_what_one_worker_writes(one_worker, two_workers):
  two = two_workers / "features"
  assert sorted(os.listdir(two_workers / "logs")) == [
    "precompute_vlm-worker-00000-of-00002.log",
    "precompute_vlm-worker-00001-of-00002.log",
  ]
  a, b = F.FeatureReader(str(one_worker)), F.FeatureReader(str(two))
  assert a.ids() == b.ids() == [f"s{i}" for i in range(NUM_SAMPLES)]  # The parts' order.
  policy = image_policy.DEFAULT.to_record()
  expected = F.FeatureMeta(
    "tiny-qwen", prompts.prompt_template(), "bfloat16", 64, image_policy=policy
  )
  assert a.meta == b.meta == expected
  # Only the layout differs: it records the worker count, which names the shard files.
  assert (a.layout.num_workers, b.layout.num_workers) == (1, 2)
  for sample_id in a.ids():
    assert np.array_equal(a.get(sample_id), b.get(sample_id)), sample_id
    assert a.text(sample_id) == b.text(sample_id)
  # The same shards, byte for byte, under other names.
  assert shards_by_ids(one_worker) == shards_by_ids(two)


_KILL_WORKER_1 = """
import os, signal, sys

if "--worker_index=1" in sys.argv:
  from genmask_jax.runtime import fileio

  publish, shards = fileio.StagedFile.publish, []

  def publish_or_die(self):
    if self.path.endswith(".array_record"):
      shards.append(self.path)
      if len(shards) == 2:  # Killed with its second shard written but not yet renamed.
        os.kill(os.getpid(), signal.SIGKILL)
    publish(self)

  fileio.StagedFile.publish = publish_or_die
"""


def test_a_killed_worker_fails_the_command_and_a_rerun_finishes_it(
  checkpoint, sample_store, two_workers, tmp_path
):
  hook = tmp_path / "hook"
  hook.mkdir()
  (hook / "sitecustomize.py").write_text(textwrap.dedent(_KILL_WORKER_1))
  out, logs = tmp_path / "features", tmp_path / "logs"
  flags = ["--gpus=cpu:2", f"--worker_logs={logs}"]

  killed = precompute(checkpoint, sample_store, out, *flags, pythonpath=str(hook))
  assert killed.returncode != 0
  assert "worker 1 of 2 (cpu:1) was killed by SIGKILL" in killed.stderr, killed.stderr[-3000:]
  assert str(logs / "precompute_vlm-worker-00001-of-00002.log") in killed.stderr
  names = set(os.listdir(out))
  assert store.part_name(0, 2) in names and store.part_name(1, 2) not in names
  assert {f"features-00000-of-00002-0000{s}.array_record" for s in (0, 1)} <= names
  assert "features-00001-of-00002-00000.array_record" in names
  assert "features-00001-of-00002-00001.array_record" not in names
  assert any(".tmp-" in n for n in names)  # The half-published shard.
  written = {n: os.stat(out / n).st_mtime_ns for n in names if n.endswith(".array_record")}

  rerun = precompute(checkpoint, sample_store, out, *flags)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  # Only worker 1 ran again (its log has a second header), and it kept its first shard.
  headers = lambda w: (
    (logs / f"precompute_vlm-worker-0000{w}-of-00002.log").read_text().count(f"# worker {w} of 2")
  )
  assert (headers(0), headers(1)) == (1, 2)
  assert {n: os.stat(out / n).st_mtime_ns for n in written} == written
  assert store_files(out) == store_files(two_workers / "features")


def test_a_complete_store_starts_no_worker(checkpoint, sample_store, two_workers):
  result = precompute(
    checkpoint,
    sample_store,
    two_workers / "features",
    "--gpus=cpu:2",
    f"--worker_logs={two_workers / 'rerun_logs'}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert not (two_workers / "rerun_logs").exists() or not os.listdir(two_workers / "rerun_logs")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_store_files_get_the_mode_the_umask_allows(tmp_path, umask, mode):
  meta = F.FeatureMeta(
    "m", prompts.prompt_template(), "bfloat16", 4, image_policy.DEFAULT.to_record()
  )
  previous = os.umask(umask)
  try:
    writer = F.FeatureWriter(str(tmp_path), meta, F.StoreLayout(2, 1, 2), 0)
    writer.write_shard(0, [F.FeatureItem(f"s{i}", "t", np.ones((3, 4))) for i in range(2)])
    assert writer.finalize()
  finally:
    os.umask(previous)
  files = sorted(tmp_path.iterdir())
  assert len(files) == 4  # store.json, shard, its ids, the worker's part.
  assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: mode for f in files}


def test_fanout_maps_nodes_to_disjoint_workers_and_strips_its_own_flags():
  covered = [fanout.node_workers(4, 3, k) for k in range(3)]
  assert [n for n, _ in covered] == [12] * 3
  assert sorted(w for _, ws in covered for w in ws) == list(range(12))
  argv = ["--samples=a", "--gpus", "all", "--num_nodes=2", "--batch_size=4", "--device=cuda:1"]
  assert fanout.forwarded_argv(argv, (*fanout.FANOUT_FLAGS, "device")) == [
    "--samples=a",
    "--batch_size=4",
  ]
  devices = fanout.parse_devices("3,5")
  assert [(d.name, d.env["CUDA_VISIBLE_DEVICES"], d.torch) for d in devices] == [
    ("GPU 3", "3", "cuda"),
    ("GPU 5", "5", "cuda"),
  ]
  with pytest.raises(fanout.FanoutError, match="cpu:N"):
    fanout.parse_devices("cpu:0")
