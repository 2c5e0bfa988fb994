"""Cluster launchers: exact dry-run commands, no process in a dry run, and real runs against
stand-ins for gcloud / sbatch / srun that record what they were asked to do."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import textwrap

import pytest

from launch import slurm_gpu, tpu_pod
from launch.common import fanout, tpu_vm

ZONE = ["--zone=us-east5-a", "--project=my-project"]
WHERE = "--zone=us-east5-a --project=my-project"


def _tpu_argv(*extra: str) -> list[str]:
  return [
    "run",
    "--name=gm-pod",
    *ZONE,
    "--accelerator_type=v5p-64",
    "--workdir=gs://bucket/runs/one",
    "--config=configs/genmask.py:tiny",
    "--config_overrides=total_steps=10",
    "--config_overrides=data.prompt=a cat",
    "--skip_compile_check",  # Compiled for the slice in the tests below.
    *extra,
  ]


@pytest.fixture
def source(tmp_path, monkeypatch):
  """A small checkout to upload; the local tarball lands in tmp_path."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  src = tmp_path / "src"
  (src / ".git").mkdir(parents=True)
  (src / ".git" / "HEAD").write_text("ref")
  (src / "requirements-train.txt").write_text("numpy\n")
  return src


def _lines(capsys) -> list[str]:
  return capsys.readouterr().out.splitlines()


def test_tpu_workers_get_the_jax_the_project_pins():
  """requirements-train.txt owns the jax version; the environment was installed from it."""
  assert tpu_vm.jax_tpu() == f"jax[tpu]=={importlib.metadata.version('jax')}"


def test_tpu_run_dry_run_prints_the_exact_commands(source, tmp_path, capsys):
  tpu_pod.main(_tpu_argv(f"--source_dir={source}", "--dry_run"))
  tarball = f"{tmp_path}/gm-pod-genmask-jax.tar.gz"
  install = (
    "rm -rf genmask-jax && mkdir genmask-jax && tar -xzf genmask-jax.tar.gz -C genmask-jax"
    " && python3 -m pip install --user --quiet uv"
    " && python3 -m uv venv --python=3.11 genmask-jax/.venv"
    " && python3 -m uv pip install --python=genmask-jax/.venv/bin/python"
    f" -r genmask-jax/requirements-train.txt '{tpu_vm.jax_tpu()}'"
  )
  train = (
    "cd genmask-jax && set -o pipefail && .venv/bin/python -m genmask_jax.main"
    " --config=configs/genmask.py:tiny --workdir=gs://bucket/runs/one"
    " --config.total_steps=10 '--config.data.prompt=a cat' 2>&1 | tee ../genmask-jax-train.log"
  )
  quote = lambda s: "'" + s.replace("'", "'\"'\"'") + "'"
  assert _lines(capsys) == [
    "# compile check skipped (--skip_compile_check)",
    "gcloud compute tpus tpu-vm create gm-pod --accelerator-type=v5p-64"
    f" --version=v2-alpha-tpuv5 {WHERE}",
    f"tar -czf {tarball} --exclude=.git --exclude=.venv --exclude=__pycache__"
    f" --exclude=.pytest_cache --exclude=.ruff_cache -C {source} .",
    f"gcloud compute tpus tpu-vm scp {tarball} gm-pod:genmask-jax.tar.gz --worker=all {WHERE}",
    f"gcloud compute tpus tpu-vm ssh gm-pod --worker=all {WHERE} {quote('--command=' + install)}",
    f"gcloud compute tpus tpu-vm ssh gm-pod --worker=all {WHERE} {quote('--command=' + train)}",
    f"gcloud compute tpus tpu-vm delete gm-pod --quiet {WHERE}",
  ]


def test_tpu_queued_spot_from_git_with_env_and_worker_logs(tmp_path, capsys):
  log_dir = tmp_path / "logs"
  argv = _tpu_argv(
    "--queued",
    "--spot",
    "--repo=https://github.com/me/genmask-jax.git",
    "--ref=v1",
    "--env=LIBTPU_INIT_ARGS=--xla_tpu_a=1 --xla_tpu_b=2",
    f"--log_dir={log_dir}",
    "--poll_seconds=30",
    "--dry_run",
  )
  tpu_pod.main(argv)
  lines = _lines(capsys)
  assert lines[:4] == [
    "# compile check skipped (--skip_compile_check)",
    "gcloud compute tpus queued-resources create gm-pod --node-id=gm-pod"
    f" --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot {WHERE}",
    "# repeated every 30 s until it prints ACTIVE:",
    f"gcloud compute tpus queued-resources describe gm-pod '--format=value(state.state)' {WHERE}",
  ]
  assert lines[-1] == f"gcloud compute tpus queued-resources delete gm-pod --force --quiet {WHERE}"
  install, mkdir, train = lines[4:-1]
  assert "'--command=rm -rf genmask-jax && git clone --quiet" in install
  assert (
    "https://github.com/me/genmask-jax.git genmask-jax && git -C genmask-jax checkout" in install
  )
  assert mkdir == f"mkdir -p {log_dir}"
  assert f"--worker=all --output-directory={log_dir} {WHERE}" in train
  assert "export '\"'\"'LIBTPU_INIT_ARGS=--xla_tpu_a=1 --xla_tpu_b=2'\"'\"' && set" in train
  assert not log_dir.exists()  # A dry run makes no folder either.


def test_tpu_single_actions_dry_run(capsys):
  base = ["--name=gm", "--zone=europe-west4-a", "--dry_run"]
  tpu_pod.main(["create", *base, "--accelerator_type=v5litepod-16"])
  tpu_pod.main(["logs", *base, "--worker=all"])
  tpu_pod.main(["train", *base, "--workdir=gs://b/r", "--detach"])
  tpu_pod.main(["delete", *base, "--queued"])
  assert _lines(capsys) == [
    "gcloud compute tpus tpu-vm create gm --accelerator-type=v5litepod-16"
    " --version=v2-alpha-tpuv5-lite --zone=europe-west4-a",
    "gcloud compute tpus tpu-vm ssh gm --worker=all --zone=europe-west4-a"
    " '--command=tail -n +1 -F genmask-jax-train.log'",
    "gcloud compute tpus tpu-vm ssh gm --worker=all --zone=europe-west4-a '--command=cd"
    " genmask-jax && (nohup .venv/bin/python -m genmask_jax.main --config=configs/genmask.py"
    " --workdir=gs://b/r > ../genmask-jax-train.log 2>&1 < /dev/null &)'",
    "gcloud compute tpus queued-resources delete gm --force --quiet --zone=europe-west4-a",
  ]


def _slurm_argv(tmp_path, *extra: str) -> list[str]:
  return [
    "--nodes=2",
    "--gpus_per_node=4",
    "--partition=gpu",
    "--account=acct",
    "--time=02:00:00",
    f"--repo_dir={tmp_path}",
    f"--log_dir={tmp_path / 'logs'}",
    "--workdir=/shared/runs/one",
    "--config_overrides=total_steps=10",
    "--config_overrides=data.prompt=a cat",
    "--env=NCCL_DEBUG=INFO",
    "--env=XLA_PYTHON_CLIENT_MEM_FRACTION=0.8",
    *extra,
  ]


def test_slurm_dry_run_prints_script_and_sbatch(tmp_path, capsys):
  slurm_gpu.main(_slurm_argv(tmp_path, "--venv=/shared/venv", "--tail", "--dry_run"))
  logs = tmp_path / "logs"
  srun = (
    "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 --label bash -c"
    " 'python -m genmask_jax.main --config=configs/genmask.py --workdir=/shared/runs/one"
    " --config.total_steps=10 '\"'\"'--config.data.prompt=a cat'\"'\"'"
    ' --coordinator_address="$COORDINATOR_ADDRESS" --num_processes="$SLURM_NTASKS"'
    ' --process_id="$SLURM_PROCID"\''
  )
  assert _lines(capsys) == [
    f"mkdir -p {logs}",
    f"cat > {logs}/genmask.sbatch <<'GENMASK_EOF'",
    "#!/bin/bash",
    "#SBATCH --job-name=genmask",
    "#SBATCH --nodes=2",
    "#SBATCH --ntasks-per-node=1",
    "#SBATCH --gpus-per-node=4",
    "#SBATCH --time=02:00:00",
    "#SBATCH --partition=gpu",
    "#SBATCH --account=acct",
    f"#SBATCH --output={logs}/%x-%j.out",
    "set -eo pipefail",
    f"cd {tmp_path}",
    "source /shared/venv/bin/activate",
    "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.8",  # --env replaces the default in place.
    "export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true",
    "export NCCL_DEBUG=INFO",
    "# jax.distributed: the first node of the allocation coordinates.",
    'NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))',
    'COORDINATOR="${NODES[0]}"',
    'export COORDINATOR_ADDRESS="$COORDINATOR:12355"',
    srun,
    "GENMASK_EOF",
    f"sbatch --parsable {logs}/genmask.sbatch",
    f"# then: tail -n +1 -F {logs}/genmask-<job id>.out",
  ]
  assert not logs.exists()


def test_dry_runs_start_no_process(source, tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f"a dry run started a process: {args}")

  for name in ("run", "Popen", "call", "check_call", "check_output"):
    monkeypatch.setattr(subprocess, name, refuse)
  monkeypatch.setattr(os, "system", refuse)
  tpu_pod.main(_tpu_argv(f"--source_dir={source}", "--queued", "--dry_run"))
  flags = ["--name=gm", "--zone=z", "--accelerator_type=v4-32", f"--source_dir={source}"]
  for action in ("create", "install", "train", "delete", "logs"):
    tpu_pod.main([action, *flags, "--workdir=gs://b/r", "--dry_run"])
  slurm_gpu.main(_slurm_argv(tmp_path, "--tail", "--dry_run"))
  assert sorted(os.listdir(tmp_path)) == ["src"]  # Nothing written: no tarball, logs, script.


# The trial config at 1024 x 1024 with 64 samples per chip of a v5litepod-4: its train step
# needs more than a v5e chip's 16 GB (tests/test_compile.py).
OVERSIZED = [
  "--config=configs/refcoco.py:trial",
  *(
    f"--config_overrides=data.{task}.{field}={value}"
    for task in ("segmentation", "generation")
    for field, value in (("resolution", 1024), ("global_batch_size", 256))
  ),
]
FITTING = [
  "--config=configs/refcoco.py:trial",
  *(
    f"--config_overrides={field}=4"
    for field in (
      "data.segmentation.global_batch_size",
      "data.generation.global_batch_size",
      "eval.batch_size",
    )
  ),
]


@pytest.mark.parametrize("action, dry", [("run", True), ("run", False), ("supervise", True)])
def test_tpu_pod_refuses_a_config_that_does_not_fit_before_any_gcloud_command(
  action, dry, bin_dir, capsys
):
  """The compile check runs in a dry run too: no gcloud command is printed, let alone run."""
  _stand_in(bin_dir, "gcloud", "")
  argv = [action, "--name=gm", *ZONE, "--accelerator_type=v5litepod-4", "--workdir=gs://b/r"]
  with pytest.raises(SystemExit) as exit_:
    tpu_pod.main(argv + OVERSIZED + (["--dry_run"] if dry else []))
  assert exit_.value.code == 1
  out, err = capsys.readouterr()
  assert "gcloud" not in out.replace("--topology", "")
  assert "does not compile or does not fit v5litepod-4" in err
  assert "nothing was created or queued" in err
  assert not (bin_dir / "calls.jsonl").exists()


def test_tpu_pod_compiles_for_the_slice_before_creating_it(capsys):
  argv = ["run", "--name=gm", *ZONE, "--accelerator_type=v5litepod-4", "--workdir=gs://b/r"]
  tpu_pod.main(argv + FITTING + ["--dry_run"])
  lines = _lines(capsys)
  check = next(i for i, line in enumerate(lines) if line.startswith("# checking:"))
  assert (
    "-m launch.compile --config=configs/refcoco.py:trial --topology=v5litepod-4" in (lines[check])
  )
  assert "--config.eval.batch_size=4" in lines[check]
  first_gcloud = next(i for i, line in enumerate(lines) if line.startswith("gcloud"))
  assert check < first_gcloud


def _stand_in(bin_dir, name: str, body: str) -> None:
  """An executable `name` on PATH: a Python script that appends its argv to calls.jsonl."""
  path = bin_dir / name
  path.write_text(
    f"#!{sys.executable}\n"
    "import json, os, sys\n"
    "argv = sys.argv[1:]\n"
    f"calls = {str(bin_dir / 'calls.jsonl')!r}\n"
    "with open(calls, 'a') as f:\n"
    f"  f.write(json.dumps([{name!r}] + argv) + '\\n')\n" + textwrap.dedent(body)
  )
  path.chmod(0o755)


def _calls(bin_dir) -> list[list[str]]:
  return [json.loads(line) for line in (bin_dir / "calls.jsonl").read_text().splitlines()]


@pytest.fixture
def bin_dir(tmp_path, monkeypatch):
  path = tmp_path / "bin"
  path.mkdir()
  monkeypatch.setenv("PATH", f"{path}{os.pathsep}{os.environ['PATH']}")
  return path


def test_tpu_run_waits_for_the_queue_and_deletes_after_a_failed_training(
  source, bin_dir, tmp_path, capsys
):
  # Queued twice, then ACTIVE; the training ssh fails.
  _stand_in(
    bin_dir,
    "gcloud",
    """
    if "describe" in argv:
      seen = sum("describe" in line for line in open(calls))
      print("ACTIVE" if seen >= 3 else "WAITING_FOR_RESOURCES")
    if any("genmask_jax.main" in a for a in argv):
      sys.exit(3)
    """,
  )
  argv = _tpu_argv(f"--source_dir={source}", "--queued", "--poll_seconds=0")
  tpu_pod.main(argv + ["--dry_run"])
  dry = [line for line in _lines(capsys) if line.startswith("gcloud")]
  with pytest.raises(subprocess.CalledProcessError) as failure:
    tpu_pod.main(argv)
  assert failure.value.returncode == 3
  calls = _calls(bin_dir)
  describes = [c for c in calls if "describe" in c]
  assert len(describes) == 3
  # The real run issued exactly the dry run's commands (describe repeated), delete included.
  assert [shlex.join(c) for c in calls if "describe" not in c] == [
    line for line in dry if "describe" not in line
  ]
  assert calls[-1][:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"]
  with tarfile.open(tmp_path / "gm-pod-genmask-jax.tar.gz") as tar:
    assert sorted(tar.getnames()) == [".", "./requirements-train.txt"]  # .git left out.


def test_tpu_run_keeps_a_failed_queued_resource_only_with_keep(source, bin_dir, capsys):
  _stand_in(bin_dir, "gcloud", 'print("FAILED") if "describe" in argv else None\n')
  argv = _tpu_argv(f"--source_dir={source}", "--queued", "--poll_seconds=0")
  with pytest.raises(RuntimeError, match="queued resource gm-pod is FAILED"):
    tpu_pod.main(argv)
  assert [c[4] for c in _calls(bin_dir)] == ["create", "describe", "delete"]
  (bin_dir / "calls.jsonl").unlink()
  with pytest.raises(RuntimeError):
    tpu_pod.main(argv + ["--keep"])
  assert [c[4] for c in _calls(bin_dir)] == ["create", "describe"]
  assert "kept gm-pod; delete it with: gcloud compute tpus queued-resources delete" in (
    capsys.readouterr().err
  )


def test_slurm_script_runs_one_process_per_node_coordinated_by_the_first(bin_dir, tmp_path):
  _stand_in(bin_dir, "sbatch", 'print("4242;cluster")\n')
  slurm_gpu.main(_slurm_argv(tmp_path, "--python=trainer", "--job_name=gm"))
  script = tmp_path / "logs" / "gm.sbatch"
  assert _calls(bin_dir) == [["sbatch", "--parsable", str(script)]]

  # Run the written script as Slurm would, with stand-ins: scontrol lists two nodes, srun
  # starts its command once per node with SLURM_PROCID set, `trainer` records what it got.
  _stand_in(bin_dir, "scontrol", 'print("node-a\\nnode-b")\n')
  _stand_in(
    bin_dir,
    "srun",
    """
    import subprocess
    nodes = int(next(a for a in argv if a.startswith("--nodes="))[8:])
    command = argv[argv.index("bash"):]
    for rank in range(nodes):
      env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_NTASKS=str(nodes))
      subprocess.run(command, env=env, check=True)
    """,
  )
  _stand_in(bin_dir, "trainer", 'print(os.getcwd(), os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"])')
  env = dict(os.environ, SLURM_JOB_NODELIST="node-[a-b]")
  job = subprocess.run(["bash", str(script)], env=env, cwd="/", capture_output=True)
  assert job.returncode == 0, job.stderr.decode()
  assert job.stdout.decode().splitlines() == [f"{tmp_path} 0.8"] * 2  # In the checkout, with env.
  trainers = [c[1:] for c in _calls(bin_dir) if c[0] == "trainer"]
  common = [
    "-m",
    "genmask_jax.main",
    "--config=configs/genmask.py",
    "--workdir=/shared/runs/one",
    "--config.total_steps=10",
    "--config.data.prompt=a cat",
    "--coordinator_address=node-a:12355",
    "--num_processes=2",
  ]
  assert trainers == [common + ["--process_id=0"], common + ["--process_id=1"]]
  assert [c[:2] for c in _calls(bin_dir) if c[0] == "scontrol"] == [["scontrol", "show"]]


def _dry_run_script(capsys) -> str:
  """The sbatch script a dry run prints as a here-document."""
  lines = _lines(capsys)
  start = next(i for i, line in enumerate(lines) if line.startswith("cat > "))
  return "\n".join(lines[start + 1 : lines.index("GENMASK_EOF")]) + "\n"


@pytest.mark.parametrize("nodes, gpus_per_node", [(3, 1), (2, 4)])
def test_slurm_precompute_array_tasks_run_disjoint_workers_covering_the_store(
  bin_dir, tmp_path, capsys, nodes, gpus_per_node
):
  slurm_gpu.main(
    [
      "--job=precompute_vlm",
      f"--nodes={nodes}",
      f"--gpus_per_node={gpus_per_node}",
      "--requeue",
      f"--repo_dir={tmp_path}",
      f"--log_dir={tmp_path / 'logs'}",
      "--python=precomputer",
      "--dry_run",
      "--",
      "--samples=data/a",
      "--checkpoint=/models/qwen",
      "--out=features/a",
    ]
  )
  script = _dry_run_script(capsys)
  lines = script.splitlines()
  directives = dict(
    line.removeprefix("#SBATCH --").partition("=")[::2] for line in lines if "#SBATCH" in line
  )
  assert "requeue" in directives and directives["nodes"] == "1"
  first, last = map(int, directives["array"].split("-"))
  gpus = int(directives["gpus-per-node"])  # What `--gpus=all` finds on each task's node.

  # Run every array task as Slurm would: srun runs its command once, `precomputer` records it.
  (tmp_path / "job.sbatch").write_text(script)
  _stand_in(bin_dir, "srun", "import subprocess\nsubprocess.run(argv[argv.index('bash'):])\n")
  _stand_in(bin_dir, "precomputer", "")
  for task in range(first, last + 1):
    env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(task))
    job = subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=env, capture_output=True)
    assert job.returncode == 0, job.stderr.decode()
  workers = []
  for call in [c[1:] for c in _calls(bin_dir) if c[0] == "precomputer"]:
    assert call[:2] == ["-m", "launch.precompute_vlm"]
    flags = dict(arg.removeprefix("--").partition("=")[::2] for arg in call[2:])
    assert flags["samples"] == "data/a" and flags["gpus"] == "all"
    total, indices = fanout.node_workers(gpus, int(flags["num_nodes"]), int(flags["node_index"]))
    assert total == nodes * gpus_per_node
    workers += indices
  assert sorted(workers) == list(range(nodes * gpus_per_node))  # Disjoint, and every worker.


@pytest.mark.parametrize(
  "module, argv, message",
  [
    (tpu_pod, _tpu_argv("--config_overrides=total_steps"), "--config_overrides: expected KEY"),
    (tpu_pod, ["train", "--name=a", "--zone=z", "--workdir=/tmp/r"], "--workdir=gs://"),
    (tpu_pod, ["create", "--name=a", "--zone=z", "--accelerator_type=v9x-8"], "v9x"),
    (tpu_pod, ["install", "--name=a", "--zone=z", "--ref=main"], "--ref needs --repo"),
    (tpu_pod, _tpu_argv("--detach"), "add --keep"),
    (slurm_gpu, ["--workdir=/r", "--env=1BAD=x"], "--env: expected KEY"),
    (slurm_gpu, ["--workdir=/r", "--nodes=0"], "at least 1"),
    (slurm_gpu, ["--nodes=2"], "--job=train takes --workdir"),
    (slurm_gpu, ["--job=precompute_vlm", "--", "--num_workers=8"], "the job array sets"),
  ],
)
def test_bad_flags_are_refused_with_the_reason(module, argv, message, capsys):
  with pytest.raises(SystemExit):
    module.main(argv + ["--dry_run"])
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("module", ["launch.predict", "launch.generate"])
def test_help_lists_the_shared_flags_once(module):
  """--help, not only --helpfull, shows the flags predict and generate share (run_flags)."""
  result = subprocess.run(
    [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
  )
  flag_lines = [
    line.strip() for line in result.stdout.splitlines() if line.strip().startswith("--")
  ]
  for flag in ("--workdir", "--vlm", "--records", "--features", "--sample_id", "--out"):
    assert any(line.startswith(f"{flag}:") for line in flag_lines), flag
  assert len(flag_lines) == len(set(flag_lines))  # No flag printed twice.
