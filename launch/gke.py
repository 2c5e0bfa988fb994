r"""Runs on GKE TPU slices: a JobSet per job, submitted with xpk or applied with kubectl.

  python -m launch.gke submit --workload=genmask-run1 --cluster=my-cluster \
      --zone=us-east5-a --project=my-project --accelerator_type=v5p-128 --num_slices=2 \
      --image=us-docker.pkg.dev/my-project/genmask/train:v1 \
      --config=configs/refcoco.py:1.3b,root=gs://my-bucket/genmask \
      --workdir=gs://my-bucket/genmask/run1 --max_restarts=20 --dry_run

Actions: `submit` (the --job: train, eval or precompute_latents), `status`, `logs`, `delete`.
--dry_run prints exactly what would run (and, for kubectl, the manifest it would apply) and
runs none of it; the compile check still runs.

`submit` first compiles the job's steps for --num_slices slices of --accelerator_type on this
machine (launch/compile.py, no TPU needed), from this checkout, which the image must hold, and
refuses to submit what does not compile or fit (--skip_compile_check to go ahead). Then, with
--submit_with=xpk (default), `xpk workload create`, which builds the JobSet and queues it through
the cluster's Kueue; with --submit_with=kubectl, the JobSet of launch/common/jobset.py written to
--manifest and `kubectl apply`'d, for clusters without xpk.

Every host of every slice runs the same command in the container: in --image's working directory
(an image with this project and its requirements installed); or, with --base_image, after
cloning --repo at --ref and installing --requirements and jax[tpu] into a virtual environment,
as launch/common/tpu_vm.py does on TPU VMs. GKE gives each pod its TPU worker identity and, across
slices, the Megascale settings: `jax.distributed.initialize()` reads them.

Preemption: a failed or preempted pod fails its slice's job; the JobSet recreates every job, up to
--max_restarts times, and the same command resumes from the last checkpoint in --workdir. After
the JobSet has finished or failed, `delete` it and `submit` the same command again: the job
continues from its checkpoint. `status`, `logs` and `delete` use kubectl, with the cluster's
credentials from `gcloud container clusters get-credentials`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Sequence

from absl import flags

from genmask_jax.runtime import accelerators
from launch.common import commands, jobset, tpu_vm
from launch.common.compile_check import check_compiles

ACTIONS = ("submit", "status", "logs", "delete")
JOBS = ("train", "eval", "precompute_latents")
# The steps each job runs, as launch/compile.py names them.
COMPILED_STEPS = {
  "train": ("train", "segment"),
  "eval": ("segment",),
  "precompute_latents": ("vae",),
}
# A DNS label, short enough for the pod names JobSet derives from it (xpk's limit).
WORKLOAD_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_NAME = 40
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
SLICE_LABEL = "jobset.sigs.k8s.io/job-index"
HOST_LABEL = "batch.kubernetes.io/job-completion-index"

FLAGS = flags.FlagValues()
define = commands.definers(FLAGS)
define.string("workload", None, "JobSet (xpk workload) name: a-z, 0-9 and -.", required=True)
define.string("cluster", None, "GKE cluster.", required=True)
define.string("zone", None, "Zone of the cluster's TPU node pools, e.g. us-east5-a.", required=True)
define.string("location", None, "The cluster's location; default: the region of --zone.")
define.string("project", None, "Google Cloud project; default: gcloud's configured project.")
define.enum("job", "train", JOBS, "What `submit` runs on the slices.")
define.enum("submit_with", "xpk", ["xpk", "kubectl"], "xpk workload create, or kubectl apply.")
define.string("accelerator_type", None, "Slice type: v5p-128, v5litepod-16, v6e-32, v4-32.")
define.integer("num_slices", 1, "Slices joined over the data-center network (data parallel).")
define.string("image", None, "Container image holding this project, in its working directory.")
define.string("base_image", None, "Or: an image with Python and git; --repo is installed first.")
define.string("repo", None, "--base_image: Git URL of this project, cloned in every container.")
define.string("ref", None, "--base_image: branch, tag or commit of --repo.")
define.string("requirements", "requirements-train.txt", "--base_image: requirements file.")
define.string("python_version", "3.11", "--base_image: Python of the virtual environment.")
define.string("config", "configs/genmask.py", "Config file, relative to the checkout.")
define.string("workdir", None, "gs:// folder of the run: checkpoints, metrics (train, eval).")
define.multi("config_overrides", help="KEY=VALUE config override.")
define.multi("env", help="NAME=VALUE set in the container.")
define.integer("max_restarts", 10, "JobSet restarts (preemptions, failures) before giving up.")
define.integer("grace_seconds", 30, "Seconds a pod has to checkpoint after SIGTERM.")
define.string("manifest", None, "kubectl: where the JobSet is written; default: a temp file.")
define.string("queue", None, "kubectl: Kueue LocalQueue (label kueue.x-k8s.io/queue-name).")
define.string("service_account", None, "kubectl: Kubernetes service account of the pods.")
define.string("mount_bucket", None, "kubectl: mount this bucket read-only (gcsfuse CSI driver).")
define.string("mount_point", "/data", "kubectl: where --mount_bucket is mounted.")
define.multi("xpk_storage", help="xpk: storage attached with `xpk storage attach` to mount.")
define.string("worker", "0", "logs: the process (slice x hosts + host) to follow, or all.")
define.bool("allow_local_workdir", help="Tests only: a local --workdir.")
define.bool("skip_compile_check", help="submit: submit without compiling for the slices first.")
define.bool("dry_run", help="Print what would run, run none of it (the compile check still runs).")


def entry_line(args: commands.Flags, python: str) -> str:
  """The job's entry point as one shell line, the same on every host."""
  overrides = commands.assignments(args.config_overrides, "--config_overrides", commands.CONFIG_KEY)
  config = [f"--config.{name}={value}" for name, value in overrides]
  if args.job == "train":
    return shlex.join(
      commands.train_command(python, args.config, args.workdir, args.config_overrides)
    )
  if args.job == "eval":
    main = [python, "-m", "genmask_jax.main", "--mode=eval", f"--workdir={args.workdir}"]
    return shlex.join(main + [f"--config={args.config}", *config])
  # precompute_latents: one worker per host of the one slice; Kubernetes sets each pod's index
  # in an Indexed Job.
  workers = [f"--num_workers={args.slice.hosts}"]
  precompute = [python, "-m", "launch.precompute_latents", f"--config={args.config}", *config]
  return shlex.join(precompute + workers) + ' --worker_index="$JOB_COMPLETION_INDEX"'


def pod_script(args: commands.Flags) -> str:
  """The bash line every container runs: the entry point, after the install with --base_image."""
  if args.image:
    return entry_line(args, "python3")
  setup = tpu_vm.and_steps(
    ["rm", "-rf", tpu_vm.REMOTE_DIR],
    *tpu_vm.clone_steps(args),
    *tpu_vm.environment_steps(args),
    ["cd", tpu_vm.REMOTE_DIR],
  )
  return f"{setup} && {entry_line(args, '.venv/bin/python')}"


def environment(args: commands.Flags) -> list[tuple[str, str]]:
  return commands.assignments(args.env, "--env", commands.ENV_NAME)


def workload(args: commands.Flags) -> jobset.Workload:
  return jobset.Workload(
    name=args.workload,
    accelerator=args.slice,
    num_slices=args.num_slices,
    image=args.image or args.base_image,
    script=pod_script(args),
    env=environment(args),
    max_restarts=args.max_restarts,
    grace_seconds=args.grace_seconds,
    queue=args.queue,
    service_account=args.service_account,
    mount_bucket=args.mount_bucket,
    mount_point=args.mount_point,
  )


def xpk_command(args: commands.Flags) -> list[str]:
  """`xpk workload create` of the job: xpk builds the JobSet (one job per slice) and queues it."""
  where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
  return [
    "xpk",
    "workload",
    "create",
    f"--cluster={args.cluster}",
    f"--workload={args.workload}",
    f"--tpu-type={args.accelerator_type}",
    f"--num-slices={args.num_slices}",
    f"--docker-image={args.image or args.base_image}",
    f"--command={pod_script(args)}",
    f"--max-restarts={args.max_restarts}",
    f"--termination-grace-period-seconds={args.grace_seconds}",
    *(f"--env={name}={value}" for name, value in environment(args)),
    *(f"--storage={name}" for name in args.xpk_storage),
    *where,
  ]


def manifest_path(args: commands.Flags) -> str:
  return args.manifest or os.path.join(tempfile.gettempdir(), f"{args.workload}.jobset.json")


def credentials_command(args: commands.Flags) -> list[str]:
  """kubectl's context for the cluster (what xpk does before each command)."""
  project = [f"--project={args.project}"] if args.project else []
  return ["gcloud", "container", "clusters", "get-credentials", args.cluster] + [
    f"--location={args.location}",
    *project,
  ]


def logs_command(args: commands.Flags) -> list[str]:
  """Follows the log of process --worker (slice-major), or of every process, with pod names."""
  selector = [f"{JOBSET_LABEL}={args.workload}"]
  if args.worker != "all":
    process = int(args.worker)
    hosts = args.slice.hosts
    selector += [f"{SLICE_LABEL}={process // hosts}", f"{HOST_LABEL}={process % hosts}"]
  streams = args.slice.hosts * args.num_slices
  return ["kubectl", "logs", "--follow", "--prefix", "--tail=-1"] + [
    f"--max-log-requests={streams}",
    f"--selector={','.join(selector)}",
  ]


def submit(shell: commands.Shell, args: commands.Flags) -> None:
  steps = COMPILED_STEPS[args.job]
  check_compiles(shell, args, steps, args.num_slices)
  if args.submit_with == "xpk":
    shell.run(xpk_command(args))
    return
  path = manifest_path(args)
  shell.write(path, json.dumps(jobset.manifest(workload(args)), indent=2) + "\n")
  shell.run(credentials_command(args))
  shell.run(["kubectl", "apply", f"--filename={path}"])


def run_action(shell: commands.Shell, args: commands.Flags) -> None:
  if args.action == "submit":
    submit(shell, args)
    return
  shell.run(credentials_command(args))
  if args.action == "status":
    shell.run(["kubectl", "get", "jobset", args.workload])
    shell.run(
      ["kubectl", "get", "pods", f"--selector={JOBSET_LABEL}={args.workload}", "-o", "wide"]
    )
  elif args.action == "logs":
    shell.run(logs_command(args))
  else:
    shell.run(["kubectl", "delete", "jobset", args.workload])


def parse_flags(argv: Sequence[str] | None = None) -> commands.Flags:
  """The action and the flags of `argv` (default: the command line); exits 2 naming a bad one."""
  rest = commands.parse(FLAGS, sys.argv[1:] if argv is None else argv, __doc__)
  args = commands.Flags(action=rest[0] if len(rest) == 1 else None, **FLAGS.flag_values_dict())
  error = commands.usage_error
  if args.action not in ACTIONS:
    error(f"give one action of {', '.join(ACTIONS)} (got {' '.join(rest) or 'none'})")
  if not WORKLOAD_NAME.fullmatch(args.workload) or len(args.workload) > MAX_NAME:
    error(
      f"--workload={args.workload}: at most {MAX_NAME} characters of a-z, 0-9 and -, starting "
      "with a letter and not ending with -"
    )
  args.location = args.location or args.zone.rpartition("-")[0]
  args.slice = None
  if args.accelerator_type:
    try:
      args.slice = accelerators.parse(args.accelerator_type)
    except ValueError as e:
      error(f"--accelerator_type: {e}")
  if args.action in ("submit", "logs") and args.slice is None:
    error(f"{args.action} needs --accelerator_type (the hosts of a slice follow from it)")
  if args.num_slices < 1:
    error(f"--num_slices={args.num_slices}: at least 1")
  if args.worker != "all" and not args.worker.isdigit():
    error(f"--worker={args.worker}: a process index (slice x hosts + host) or all")
  if args.action == "submit":
    _check_submit(args)
  return args


def _check_submit(args: commands.Flags) -> None:
  error = commands.usage_error
  if bool(args.image) == bool(args.base_image):
    error("give --image (with this project installed) or --base_image (with --repo), one of them")
  if args.base_image and not args.repo:
    error("--base_image needs --repo: the containers clone and install it")
  if args.ref and not args.repo:
    error("--ref needs --repo")
  if args.job in ("train", "eval"):
    if not args.workdir:
      error(f"--job={args.job} needs --workdir")
    if not args.workdir.startswith("gs://") and not args.allow_local_workdir:
      error(f"--job={args.job} needs --workdir=gs://...: every host reads and writes it")
  if args.job == "precompute_latents" and args.num_slices != 1:
    error("--job=precompute_latents runs on one slice (--num_slices=1): a larger slice is faster")
  if args.submit_with == "xpk":
    kubectl_only = ("manifest", "queue", "service_account", "mount_bucket")
    given = [f"--{name}" for name in kubectl_only if getattr(args, name)]
    if given:
      error(
        f"{', '.join(given)}: for --submit_with=kubectl; xpk queues through the cluster's own "
        "Kueue queue and mounts storage attached with `xpk storage attach` (--xpk_storage)"
      )
  elif args.xpk_storage:
    error("--xpk_storage is for --submit_with=xpk; with kubectl, mount data with --mount_bucket")
  if args.mount_bucket:
    args.mount_bucket = args.mount_bucket.removeprefix("gs://").strip("/")
    if not args.mount_bucket or "/" in args.mount_bucket:
      error("--mount_bucket: a bucket name (gs://NAME), not a folder in it")
  try:
    environment(args)
    commands.assignments(args.config_overrides, "--config_overrides", commands.CONFIG_KEY)
  except ValueError as e:
    error(str(e))


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_flags(argv)
  run_action(commands.Shell(args.dry_run), args)


if __name__ == "__main__":
  main()
