"""launch/gke.py: the xpk command it prints parses with the pinned xpk's own parser; the JobSet it
writes validates against Kubernetes' schemas (pod templates) and our schema of the JobSet fields
(from the API reference of jobset v0.12.0); a resubmitted job continues from its checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import sys
import types
from unittest import mock

import jsonschema
import kubernetes_validate
import pytest
from conftest import fake_devices
from processes import Processes, wait
from training_data import make_stores

from genmask_jax.runtime import accelerators
from launch import gke
from launch.common import commands, jobset

SCHEMA = os.path.join(os.path.dirname(__file__), "schemas", "jobset-v1alpha2-v0.12.0.schema.json")
KUBERNETES = "1.33.0"  # GKE's regular release channel.
IMAGE = "us-docker.pkg.dev/my-project/genmask/train:v1"
# The acceptance case: 2 slices of v5p-128, the 1.3B recipe.
ARGV = [
  "submit",
  "--workload=genmask-run1",
  "--cluster=my-cluster",
  "--zone=us-east5-a",
  "--project=my-project",
  "--accelerator_type=v5p-128",
  "--num_slices=2",
  f"--image={IMAGE}",
  "--config=configs/refcoco.py:1.3b,root=gs://my-bucket/genmask",
  "--workdir=gs://my-bucket/genmask/run1",
  "--config_overrides=total_steps=4000",
  "--env=LIBTPU_INIT_ARGS=--xla_tpu_a=1 --xla_tpu_b=2",
  "--max_restarts=20",
  "--skip_compile_check",  # Compiling the 1.3B step for 128 chips takes long here.
  "--dry_run",
]


def _stdout(capsys, argv) -> list[str]:
  gke.main(argv)
  return capsys.readouterr().out.splitlines()


def printed_manifest(capsys, argv) -> dict:
  """The JobSet a kubectl dry run prints as a here-document."""
  lines = _stdout(capsys, argv + ["--submit_with=kubectl"])
  start = next(i for i, line in enumerate(lines) if line.startswith("cat > "))
  return json.loads("\n".join(lines[start + 1 : lines.index(commands._HEREDOC_END)]))


def xpk_parser() -> argparse.ArgumentParser:
  """`xpk workload ...` exactly as the pinned xpk defines it (xpk.parser.workload). The parser
  module imports the commands' implementations only to bind them as defaults; they need xpk's
  cluster clients (kubernetes, Google Cloud libraries) at versions that conflict with this
  project's, so stand-ins that refuse to run take their place."""

  def refuse(args):
    raise AssertionError("the xpk command would run")

  stand_in = types.ModuleType("xpk.commands.workload")
  for name in ("workload_create", "workload_create_pathways", "workload_delete", "workload_list"):
    setattr(stand_in, name, refuse)
  with mock.patch.dict(sys.modules, {"xpk.commands.workload": stand_in}):
    from xpk.parser.workload import set_workload_parsers

  parser = argparse.ArgumentParser(prog="xpk")
  set_workload_parsers(parser.add_subparsers(dest="command").add_parser("workload"))
  return parser


def test_xpk_command_parses_with_xpks_parser(capsys):
  (check, line) = _stdout(capsys, ARGV)
  assert check == "# compile check skipped (--skip_compile_check)"
  argv = shlex.split(line)
  assert argv[:3] == ["xpk", "workload", "create"]
  parsed = xpk_parser().parse_args(argv[1:])
  assert (parsed.workload, parsed.cluster, parsed.zone, parsed.project) == (
    "genmask-run1",
    "my-cluster",
    "us-east5-a",
    "my-project",
  )
  assert (parsed.tpu_type, parsed.num_slices, parsed.docker_image) == ("v5p-128", 2, IMAGE)
  assert parsed.max_restarts == "20" and parsed.env == [
    "LIBTPU_INIT_ARGS=--xla_tpu_a=1 --xla_tpu_b=2"
  ]
  assert shlex.split(parsed.command) == [
    "python3",
    "-m",
    "genmask_jax.main",
    "--config=configs/refcoco.py:1.3b,root=gs://my-bucket/genmask",
    "--workdir=gs://my-bucket/genmask/run1",
    "--config.total_steps=4000",
  ]
  # The parser is xpk's: it refuses a TPU type xpk does not know.
  with pytest.raises(SystemExit):
    xpk_parser().parse_args([*argv[1:], "--tpu-type=v5p-12"])


def test_jobset_validates_against_kubernetes_and_jobset_schemas(capsys):
  manifest = printed_manifest(capsys, ARGV)
  with open(SCHEMA) as f:
    schema = json.load(f)
  jsonschema.Draft202012Validator(schema).validate(manifest)
  name = manifest["metadata"]["name"]
  for replicated in manifest["spec"]["replicatedJobs"]:
    # What the JobSet controller creates from the template: Job <jobset>-<job>-<index>.
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{name}-slice-0"}}
    kubernetes_validate.validate(dict(job, **replicated["template"]), KUBERNETES, strict=True)

  # Both validators refuse what they should: a misspelt JobSet field, an unknown pod field.
  typo = json.loads(json.dumps(manifest))
  typo["spec"]["replicatedJobs"][0]["replica"] = typo["spec"]["replicatedJobs"][0].pop("replicas")
  with pytest.raises(jsonschema.ValidationError, match="replica"):
    jsonschema.validate(typo, schema)
  template = json.loads(json.dumps(manifest["spec"]["replicatedJobs"][0]["template"]))
  template["spec"]["template"]["spec"]["containers"][0]["imag"] = IMAGE
  with pytest.raises(kubernetes_validate.ValidationError):
    kubernetes_validate.validate(dict(job, **template), KUBERNETES, strict=True)


@pytest.mark.parametrize(
  "accelerator, slices, hosts, chips, gke_accelerator, topology",
  [  # Cloud TPU's slice shapes: hosts of a slice and chips per host (GKE machine types).
    ("v5p-128", 2, 16, 4, "tpu-v5p-slice", "4x4x4"),
    ("v5p-8", 4, 1, 4, "tpu-v5p-slice", "2x2x1"),
    ("v5litepod-16", 2, 4, 4, "tpu-v5-lite-podslice", "4x4"),
    ("v5litepod-8", 3, 1, 8, "tpu-v5-lite-podslice", "2x4"),
    ("v6e-32", 4, 8, 4, "tpu-v6e-slice", "4x8"),
    ("v6e-8", 2, 1, 8, "tpu-v6e-slice", "2x4"),
  ],
)
def test_multislice_jobset_has_one_job_per_slice(
  capsys, accelerator, slices, hosts, chips, gke_accelerator, topology
):
  argv = [*ARGV[:5], f"--accelerator_type={accelerator}", f"--num_slices={slices}", *ARGV[7:]]
  manifest = printed_manifest(capsys, argv)
  assert manifest["metadata"]["annotations"] == {jobset.EXCLUSIVE_TOPOLOGY: jobset.NODE_POOL}
  (replicated,) = manifest["spec"]["replicatedJobs"]
  assert replicated["replicas"] == slices
  job = replicated["template"]["spec"]
  assert job["parallelism"] == job["completions"] == hosts
  pod = job["template"]["spec"]
  assert pod["nodeSelector"] == {
    "cloud.google.com/gke-tpu-accelerator": gke_accelerator,
    "cloud.google.com/gke-tpu-topology": topology,
  }
  (container,) = pod["containers"]
  assert container["resources"]["limits"] == {"google.com/tpu": str(chips)}
  assert hosts * chips == accelerators.parse(accelerator).chips
  assert manifest["spec"]["failurePolicy"] == {"maxRestarts": 20}


def test_one_slice_needs_no_exclusive_topology(capsys):
  argv = [*ARGV[:6], "--num_slices=1", *ARGV[7:]]
  assert "annotations" not in printed_manifest(capsys, argv)["metadata"]


def test_base_image_installs_the_project_then_runs_the_job(capsys):
  argv = [arg for arg in ARGV if not arg.startswith("--image=")] + [
    "--base_image=python:3.11",
    "--repo=https://github.com/me/genmask-jax.git",
    "--ref=v1",
    "--job=precompute_latents",
    "--num_slices=1",
    "--mount_bucket=gs://my-data",
    "--service_account=genmask",
    "--queue=team-queue",
  ]
  manifest = printed_manifest(capsys, argv)
  assert manifest["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "team-queue"}
  pod = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
  assert pod["metadata"]["annotations"] == {"gke-gcsfuse/volumes": "true"}
  (volume,) = pod["spec"]["volumes"]
  assert volume["csi"]["volumeAttributes"]["bucketName"] == "my-data"
  (container,) = pod["spec"]["containers"]
  assert container["image"] == "python:3.11"
  assert container["volumeMounts"] == [{"name": "data", "mountPath": "/data", "readOnly": True}]
  script = container["command"][2]
  assert script.startswith(
    "rm -rf genmask-jax && git clone --quiet https://github.com/me/genmask-jax.git genmask-jax"
    " && git -C genmask-jax checkout --quiet v1 && python3 -m pip install --user --quiet uv"
  )
  # One latent worker per host of the v5p-128 slice, each its pod's index.
  assert script.endswith(
    " && cd genmask-jax && .venv/bin/python -m launch.precompute_latents"
    " --config=configs/refcoco.py:1.3b,root=gs://my-bucket/genmask --config.total_steps=4000"
    ' --num_workers=16 --worker_index="$JOB_COMPLETION_INDEX"'
  )


def test_status_logs_delete_go_through_kubectl(capsys):
  base = ["--workload=gm", "--cluster=c", "--zone=europe-west4-a", "--dry_run"]
  slice_ = ["--accelerator_type=v5litepod-16", "--num_slices=2"]
  credentials = "gcloud container clusters get-credentials c --location=europe-west4"
  assert _stdout(capsys, ["status", *base]) == [
    credentials,
    "kubectl get jobset gm",
    "kubectl get pods --selector=jobset.sigs.k8s.io/jobset-name=gm -o wide",
  ]
  # Process 5: slice 1, host 1 (4 hosts per slice).
  assert _stdout(capsys, ["logs", *base, *slice_, "--worker=5"]) == [
    credentials,
    "kubectl logs --follow --prefix --tail=-1 --max-log-requests=8"
    " --selector=jobset.sigs.k8s.io/jobset-name=gm,jobset.sigs.k8s.io/job-index=1,"
    "batch.kubernetes.io/job-completion-index=1",
  ]
  assert _stdout(capsys, ["delete", *base])[1:] == ["kubectl delete jobset gm"]


def test_submit_compiles_for_the_slices_first(capsys, monkeypatch):
  checked = []
  monkeypatch.setattr(commands.Shell, "check", lambda self, cmd, cwd=None: checked.append(cmd))
  lines = _stdout(capsys, [arg for arg in ARGV if arg != "--skip_compile_check"])
  assert len(checked) == 1 and lines[0].startswith("xpk workload create")
  assert checked[0][1:] == [
    "-m",
    "launch.compile",
    "--config=configs/refcoco.py:1.3b,root=gs://my-bucket/genmask",
    "--topology=v5p-128",
    "--num_slices=2",
    "--steps=train,segment",
    "--config.total_steps=4000",
  ]


@pytest.mark.parametrize(
  "extra, message",
  [
    (["--workload=Run_1"], "--workload=Run_1: at most 40 characters"),
    (["--base_image=python:3.11"], "give --image (with this project installed) or --base_image"),
    (["--job=precompute_latents"], "--job=precompute_latents runs on one slice"),
    (["--mount_bucket=data"], "--mount_bucket: for --submit_with=kubectl"),
    (["--workdir=/tmp/run"], "needs --workdir=gs://"),
    (["--accelerator_type=v5p-12"], "v5p comes in sizes"),
    (["--env=1A=b"], "--env: expected KEY=VALUE"),
  ],
)
def test_bad_flags_are_refused_naming_them(capsys, extra, message):
  with pytest.raises(SystemExit) as exit_:
    gke.main(ARGV + extra)
  assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("stores"))
  make_stores(root)
  return root


def test_resubmitted_job_continues_from_its_checkpoint(capsys, stores, tmp_path):
  """A job's pods killed after a checkpoint (a preempted slice), then the same job submitted
  again (same workload, same work directory): its container command, run as the pod would,
  continues from the checkpoint."""
  workdir = str(tmp_path / "run")
  argv = [
    "submit",
    "--workload=gm-resume",
    "--cluster=c",
    "--zone=us-east5-a",
    "--accelerator_type=v5litepod-8",  # One host: one pod, run here.
    "--image=local",
    f"--config=tests/train_config.py:{stores}",
    f"--workdir={workdir}",
    "--config_overrides=total_steps=6",
    "--env=JAX_PLATFORMS=cpu",
    f"--env=XLA_FLAGS={fake_devices(8)}",
    "--env=PYTHONPATH=.:tests",
    f"--manifest={tmp_path / 'jobset.json'}",
    "--allow_local_workdir",
    "--skip_compile_check",
    "--dry_run",
  ]
  first = printed_manifest(capsys, argv)
  assert printed_manifest(capsys, argv) == first  # The same job, submitted again.
  (container,) = first["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
    "containers"
  ]
  env = dict(os.environ, **{e["name"]: e["value"] for e in container["env"]})
  env["PATH"] = (
    f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"  # The image's python3.
  )
  ckpt = os.path.join(workdir, "checkpoints")
  reached = lambda: os.path.isdir(ckpt) and "2" in os.listdir(ckpt)  # Step 2 committed.
  logs = [str(tmp_path / "pod-attempt1.log"), str(tmp_path / "pod-attempt2.log")]
  with Processes() as processes:
    pod = processes.start(container["command"], logs[0], env=env, cwd=commands.PROJECT_ROOT)
    wait([pod], [logs[0], workdir], until=reached, poll_s=0.02)
    assert pod.poll() is None, "ended before the kill:\n" + processes.log(pod)[-3000:]
    pod.send_signal(signal.SIGKILL)
    assert pod.wait() == -signal.SIGKILL
    first_log = processes.log(pod)
    pod = processes.start(container["command"], logs[1], env=env, cwd=commands.PROJECT_ROOT)
    wait([pod], [logs[1], workdir])
    assert pod.wait() == 0, processes.log(pod)[-3000:]
    second_log = processes.log(pod)
  assert "resuming from step" not in first_log
  resumed = int(re.search(r"resuming from step (\d+)", second_log).group(1))
  assert 2 <= resumed < 6
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [r["step"] for r in map(json.loads, f) if "loss" in r]
  assert set(steps) == set(range(1, 7)) and steps[-(6 - resumed) :] == list(range(resumed + 1, 7))
