r"""Trains on a Cloud TPU VM or pod slice: create, install, train on every worker, delete.

  python -m launch.tpu_pod run --name=genmask-v5p --zone=us-east5-a --project=my-project \
      --accelerator_type=v5p-64 --queued --spot \
      --config=configs/genmask.py --workdir=gs://my-bucket/genmask/run1 \
      --config_overrides=total_steps=20000

Actions: `run` (create, install, train, then delete the TPU even when training fails or is
interrupted, unless --keep), `supervise` (the same, detached from this process and restarted on
preemption: launch/common/tpu_supervisor.py), `status` (of a supervised or detached run), `create`,
`install`, `train`, `delete`, `logs`. --dry_run prints the exact gcloud commands and runs none.

The TPU is a TPU VM (`tpu-vm create`) or, with --queued, a queued resource whose node has the
same name (created when capacity frees up; we poll until ACTIVE). Every worker gets the project
(a tarball of --source_dir, or `git clone` of --repo at --ref) under ~/genmask-jax, a Python
--python_version virtual environment made by uv (TPU images ship an older Python) with
--requirements and jax[tpu], then runs the same training command; `jax.distributed` finds its
peers from the TPU metadata. Each worker also writes ~/genmask-jax-train.log, which `logs` tails
(and which a --detach'ed run writes to instead of the ssh stream). With --mount_bucket, `install`
also mounts that bucket read-only with gcsfuse at --mount_point on every worker.

`run` and `supervise` first compile the config's train and segmentation steps for
--accelerator_type on this machine (launch/compile.py, no TPU needed), and refuse to create or
queue anything when a step does not compile or does not fit the chips' HBM
(--skip_compile_check to go ahead regardless).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Sequence

from absl import flags

from genmask_jax.runtime import accelerators
from launch.common import commands, tpu_supervisor, tpu_vm
from launch.common.compile_check import check_compiles
from launch.common.tpu_vm import (
  create_command,
  delete_command,
  describe_command,
  install,
  runtime_version,
  ssh_command,
)

_QUEUED_FAILED = ("FAILED", "SUSPENDING", "SUSPENDED", "DELETING")
ACTIONS = ("run", "supervise", "status", "create", "install", "train", "delete", "logs")
# This launcher's own flags (not absl's global FLAGS): tests run main() again in one process,
# beside other launchers with flags of the same names.
FLAGS = flags.FlagValues()
define = commands.definers(FLAGS)
define.string("name", None, "TPU (and queued resource) name.", required=True)
define.string("zone", None, "Zone of the TPU.", required=True)
define.string("project", None, "Google Cloud project; default: gcloud's configured project.")
define.string("accelerator_type", None, "e.g. v5p-64, v5litepod-16, v6e-32, v4-32 (run, create).")
define.string("runtime_version", None, "TPU software version; default: by accelerator family.")
define.bool("queued", help="Request a queued resource and wait for it.")
define.bool("spot", help="Spot capacity (cheaper, can be preempted).")
define.float("poll_seconds", 60, "Interval of queued-resource polling and of supervise's checks.")
define.string(
  "source_dir",
  None,
  f"Local checkout to upload; default (without --repo): {commands.PROJECT_ROOT}.",
)
define.multi("exclude", help="More tar --exclude patterns for uploads.")
define.string("repo", None, "Git URL the workers clone instead of an upload.")
define.string("ref", None, "Branch, tag or commit of --repo to check out.")
define.string(
  "requirements",
  "requirements-train.txt",
  "Requirements file in the checkout (the training side only: no PyTorch).",
)
define.string("python_version", "3.11", "Python of the workers' virtual environment.")
define.string("config", "configs/genmask.py", "Config file, relative to the checkout.")
define.string("workdir", None, "gs:// folder for checkpoints and metrics, shared by all workers.")
define.multi("config_overrides", help="KEY=VALUE config override.")
define.multi("env", help="NAME=VALUE exported before training.")
define.string("log_dir", None, "Local folder for per-worker logs N.log instead of the console.")
define.string("worker", "0", "Worker(s) whose log `logs` follows: 0, 1-3 or all.")
define.bool("detach", help="train: start training and return at once.")
define.bool("keep", help="run, supervise: do not delete the TPU at the end.")
define.integer("max_restarts", 10, "supervise: slice rebuilds before giving up.")
define.float("backoff_seconds", 60, "supervise: wait before a rebuild.")
define.float("max_backoff_seconds", 1800, "supervise: the doubling's cap.")
define.float(
  "stall_minutes", 60, "supervise: rebuild when no new step was logged for this long (0: never)."
)
define.float(
  "transition_timeout",
  60,
  "supervise: minutes a slice may stay PROVISIONING, SUSPENDING, STOPPING, ... (and an install "
  "command may run) before a rebuild (0: no limit).",
)
define.float(
  "queue_timeout",
  0,
  "supervise: minutes a queued slice may wait for capacity (WAITING_FOR_RESOURCES) before it is "
  "deleted and queued again (0: as long as it takes).",
)
define.integer(
  "max_install_retries",
  6,
  "supervise: installs tried again on a healthy slice, in a row, before giving up (a package "
  "index that is down); they have their own backoff and use up no restart.",
)
define.string(
  "mount_bucket", None, "install: gcsfuse-mount this data bucket read-only on every worker."
)
define.string("mount_point", "/tmp/gcsfuse", "Where --mount_bucket is mounted.")
define.string(
  "mount_cache_dir", None, "gcsfuse file cache folder on the workers (default: no cache)."
)
define.bool(
  "allow_local_workdir", help="Tests only: a local --workdir, which a real pod cannot share."
)
define.bool(
  "skip_compile_check",
  help="run, supervise: queue without compiling for --accelerator_type first (launch/compile).",
)
define.bool("dry_run", help="Print the commands, run none (the compile check still runs).")


def train_command(args: commands.Flags) -> list[str]:
  env = commands.assignments(args.env, "--env", commands.ENV_NAME)
  setup = tpu_vm.and_steps(["cd", tpu_vm.REMOTE_DIR], *(["export", f"{k}={v}"] for k, v in env))
  train = shlex.join(
    commands.train_command(".venv/bin/python", args.config, args.workdir, args.config_overrides)
  )
  log = shlex.quote(f"../{tpu_vm.REMOTE_LOG}")
  if args.detach:  # The subshell returns at once, so ssh does not wait for training.
    remote = f"{setup} && (nohup {train} > {log} 2>&1 < /dev/null &)"
  else:
    remote = f"{setup} && set -o pipefail && {train} 2>&1 | tee {log}"
  return ssh_command(args, "all", remote, args.log_dir)


def logs_command(args: commands.Flags) -> list[str]:
  follow = shlex.join(["tail", "-n", "+1", "-F", tpu_vm.REMOTE_LOG])
  return ssh_command(args, args.worker, follow, args.log_dir)


def _wait_until_ready(shell: commands.Shell, args: commands.Flags) -> None:
  """A TPU VM is ready when `create` returns; a queued resource when it turns ACTIVE."""
  if not args.queued:
    return
  if shell.dry_run:
    shell.note(f"repeated every {args.poll_seconds:g} s until it prints ACTIVE:")
    shell.run(describe_command(args))
    return
  while (state := shell.read(describe_command(args)).strip()) != "ACTIVE":
    if state in _QUEUED_FAILED:
      raise RuntimeError(f"queued resource {args.name} is {state}; `describe` it for the reason")
    shell.note(f"queued resource {args.name} is {state}; asking again in {args.poll_seconds:g} s")
    time.sleep(args.poll_seconds)


def _create(shell: commands.Shell, args: commands.Flags) -> None:
  shell.run(create_command(args))
  _wait_until_ready(shell, args)


def _with_log_dir(shell: commands.Shell, args: commands.Flags, cmd: list[str]) -> None:
  if args.log_dir:  # gcloud requires the folder to exist.
    shell.makedirs(args.log_dir)
  shell.run(cmd)


def _run(shell: commands.Shell, args: commands.Flags) -> None:
  shell.run(create_command(args))
  try:  # From here on the TPU exists: delete it whatever happens, unless told to keep it.
    _wait_until_ready(shell, args)
    install(shell, args)
    _with_log_dir(shell, args, train_command(args))
  finally:
    if args.keep:
      shell.note(f"kept {args.name}; delete it with: {shlex.join(delete_command(args))}")
    else:
      shell.run(delete_command(args))


def parse_flags(argv: Sequence[str] | None = None) -> commands.Flags:
  """The action and the flags of `argv` (default: the command line); exits 2 naming a bad one."""
  rest = commands.parse(FLAGS, sys.argv[1:] if argv is None else argv, __doc__)
  args = commands.Flags(action=rest[0] if len(rest) == 1 else None, **FLAGS.flag_values_dict())
  error = commands.usage_error
  action = args.action
  if action not in ACTIONS:
    error(f"give one action of {', '.join(ACTIONS)} (got {' '.join(rest) or 'none'})")
  if action in ("run", "supervise", "create") and not args.accelerator_type:
    error(f"{action} needs --accelerator_type")
  if action in ("run", "supervise", "train", "status") and not args.workdir:
    error(f"{action} needs --workdir")
  if action in ("run", "supervise", "train") and not args.workdir.startswith("gs://"):
    if not args.allow_local_workdir:
      error(f"{action} needs --workdir=gs://...: every worker reads and writes it")
  if args.mount_bucket:
    args.mount_bucket = args.mount_bucket.removeprefix("gs://").strip("/")
    if not args.mount_bucket or "/" in args.mount_bucket:
      error("--mount_bucket: a bucket name (gs://NAME), not a folder in it")
  if args.repo and args.source_dir:
    error("give --repo or --source_dir, not both")
  if args.ref and not args.repo:
    error("--ref needs --repo")
  if action == "run" and args.detach and not args.keep:
    error("run --detach would delete the TPU while it trains: add --keep")
  if not args.repo:
    args.source_dir = args.source_dir or commands.PROJECT_ROOT
    if not os.path.isdir(args.source_dir):
      error(f"--source_dir={args.source_dir} is not a folder")
  try:
    commands.assignments(args.config_overrides, "--config_overrides", commands.CONFIG_KEY)
    commands.assignments(args.env, "--env", commands.ENV_NAME)
    if args.accelerator_type:
      runtime_version(args)
    if action == "supervise":  # It expects an answer from each of the slice's hosts.
      accelerators.parse(args.accelerator_type)
  except ValueError as e:
    error(str(e))
  return args


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_flags(argv)
  shell = commands.Shell(args.dry_run)
  if args.action in ("run", "supervise"):
    check_compiles(shell, args, checkout=args.source_dir)
  if args.action == "run":
    _run(shell, args)
  elif args.action in ("supervise", "status"):
    getattr(tpu_supervisor, args.action)(shell, args)
  elif args.action == "create":
    _create(shell, args)
  elif args.action == "install":
    install(shell, args)
  elif args.action == "train":
    _with_log_dir(shell, args, train_command(args))
  elif args.action == "logs":
    _with_log_dir(shell, args, logs_command(args))
  else:
    shell.run(delete_command(args))


if __name__ == "__main__":
  main()
