"""A Cloud TPU VM or queued resource as gcloud commands: create, describe, delete, ssh, install.

launch/tpu_pod.py runs them once; launch/common/tpu_supervisor.py again after each preemption.
Commands are argument lists (commands.py), so a dry run prints exactly what a real one executes.
Every worker gets the project under ~/genmask-jax and a virtual environment with --requirements
and jax[tpu] at the version requirements-train.txt pins.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from collections.abc import Sequence

from launch.common import commands

REMOTE_DIR = "genmask-jax"  # Relative to the worker's home, where ssh commands start.
REMOTE_LOG = "genmask-jax-train.log"
REMOTE_TARBALL = "genmask-jax.tar.gz"
SOURCE_EXCLUDES = (".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache")
# The software version Cloud TPU documents for JAX, by accelerator family.
RUNTIME_VERSIONS = {
  "v6e": "v2-alpha-tpuv6e",
  "v5p": "v2-alpha-tpuv5",
  "v5litepod": "v2-alpha-tpuv5-lite",
  "v4": "tpu-ubuntu2204-base",
  "v3": "tpu-ubuntu2204-base",
  "v2": "tpu-ubuntu2204-base",
}
# The file that pins the project's jax version: TPU workers get jax[tpu] at that version.
JAX_PIN_FILE = os.path.join(commands.PROJECT_ROOT, "requirements-train.txt")
# Read-only data that never changes while mounted: cache metadata and listings forever (the
# flags the large JAX codebases mount ArrayRecord data sets with).
GCSFUSE_FLAGS = (
  "-o",
  "ro",
  "--implicit-dirs",
  "--type-cache-max-size-mb=-1",
  "--stat-cache-max-size-mb=-1",
  "--metadata-cache-ttl-secs=-1",
  "--kernel-list-cache-ttl-secs=-1",
)
GCSFUSE_APT = (  # Google's apt repository for gcsfuse, as its install guide sets it up.
  'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc]'
  ' https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main"'
  " | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null"
  " && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
  " | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null"
  " && sudo apt-get -o DPkg::Lock::Timeout=600 update -qq"
  " && sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse"
)


def jax_tpu() -> str:
  """`jax[tpu]==VERSION` for the jax version JAX_PIN_FILE pins."""
  with open(JAX_PIN_FILE) as f:
    pins = re.findall(r"^jax==(\S+)$", f.read(), re.M)
  if len(pins) != 1:
    raise ValueError(f"{JAX_PIN_FILE}: expected one `jax==VERSION` line, found {len(pins)}")
  return f"jax[tpu]=={pins[0]}"


def gcloud(args: commands.Flags, group: str, verb: str, *rest: str) -> list[str]:
  where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
  return ["gcloud", "compute", "tpus", group, verb, *rest, *where]


def runtime_version(args: commands.Flags) -> str:
  if args.runtime_version:
    return args.runtime_version
  family = args.accelerator_type.rpartition("-")[0]
  if family not in RUNTIME_VERSIONS:
    raise ValueError(
      f"--accelerator_type={args.accelerator_type}: no default runtime for {family!r} "
      f"(known: {sorted(RUNTIME_VERSIONS)}); pass --runtime_version"
    )
  return RUNTIME_VERSIONS[family]


def create_command(args: commands.Flags) -> list[str]:
  spot = ["--spot"] if args.spot else []
  accelerator = f"--accelerator-type={args.accelerator_type}"
  if args.queued:
    return gcloud(
      args,
      "queued-resources",
      "create",
      args.name,
      f"--node-id={args.name}",
      accelerator,
      f"--runtime-version={runtime_version(args)}",
      *spot,
    )
  return gcloud(
    args, "tpu-vm", "create", args.name, accelerator, f"--version={runtime_version(args)}", *spot
  )


def describe_command(args: commands.Flags) -> list[str]:
  return gcloud(args, "queued-resources", "describe", args.name, "--format=value(state.state)")


def delete_command(args: commands.Flags) -> list[str]:
  if args.queued:  # --force deletes the node too.
    return gcloud(args, "queued-resources", "delete", args.name, "--force", "--quiet")
  return gcloud(args, "tpu-vm", "delete", args.name, "--quiet")


def ssh_command(
  args: commands.Flags, worker: str, remote: str, log_dir: str | None = None
) -> list[str]:
  """`remote` runs in the worker's login shell; with log_dir, worker N's output goes to N.log."""
  logs = [f"--output-directory={log_dir}"] if log_dir else []
  return gcloud(args, "tpu-vm", "ssh", args.name, f"--worker={worker}", *logs) + [
    f"--command={remote}"
  ]


def and_steps(*steps: Sequence[str]) -> str:
  """One shell line running `steps` in order, stopping at the first that fails."""
  return " && ".join(shlex.join(step) for step in steps)


def local_tarball(args: commands.Flags) -> str:
  return os.path.join(tempfile.gettempdir(), f"{args.name}-{REMOTE_TARBALL}")


def upload_commands(args: commands.Flags) -> list[list[str]]:
  """Packs --source_dir and copies it to every worker; nothing to do for --repo."""
  if args.repo:
    return []
  tarball = local_tarball(args)
  excludes = [f"--exclude={pattern}" for pattern in (*SOURCE_EXCLUDES, *args.exclude)]
  return [
    ["tar", "-czf", tarball, *excludes, "-C", args.source_dir, "."],
    gcloud(args, "tpu-vm", "scp", tarball, f"{args.name}:{REMOTE_TARBALL}", "--worker=all"),
  ]


def clone_steps(args: commands.Flags) -> list[list[str]]:
  """--repo cloned into REMOTE_DIR, at --ref if given."""
  checkout = [["git", "-C", REMOTE_DIR, "checkout", "--quiet", args.ref]] if args.ref else []
  return [["git", "clone", "--quiet", args.repo, REMOTE_DIR], *checkout]


def environment_steps(args: commands.Flags) -> list[list[str]]:
  """A --python_version virtual environment in REMOTE_DIR/.venv (made by uv: TPU images ship an
  older Python) with the checkout's --requirements and jax[tpu]."""
  python = f"{REMOTE_DIR}/.venv/bin/python"
  return [
    ["python3", "-m", "pip", "install", "--user", "--quiet", "uv"],
    ["python3", "-m", "uv", "venv", f"--python={args.python_version}", f"{REMOTE_DIR}/.venv"],
    ["python3", "-m", "uv", "pip", "install", f"--python={python}"]
    + ["-r", f"{REMOTE_DIR}/{args.requirements}", jax_tpu()],
  ]


def install_command(args: commands.Flags) -> list[str]:
  if args.repo:
    source = clone_steps(args)
  else:
    source = [["mkdir", REMOTE_DIR], ["tar", "-xzf", REMOTE_TARBALL, "-C", REMOTE_DIR]]
  remote = and_steps(["rm", "-rf", REMOTE_DIR], *source, *environment_steps(args))
  return ssh_command(args, "all", remote)


def mount_command(args: commands.Flags) -> list[str]:
  """Installs gcsfuse (unless present) and mounts --mount_bucket read-only on every worker."""
  point = shlex.quote(args.mount_point)
  cache = []
  if args.mount_cache_dir:  # gcsfuse's file cache only exists with a cache folder.
    cache = [f"--cache-dir={args.mount_cache_dir}", "--file-cache-max-size-mb=-1"]
  mount = shlex.join(["gcsfuse", *GCSFUSE_FLAGS, *cache, args.mount_bucket, args.mount_point])
  remote = (
    f"{{ command -v gcsfuse > /dev/null || {{ {GCSFUSE_APT}; }}; }}"
    f" && mkdir -p {point} && {{ mountpoint -q {point} || {mount}; }}"
  )
  return ssh_command(args, "all", remote)


def install(shell: commands.Shell, args: commands.Flags, timeout: float | None = None) -> None:
  """Uploads (or clones) the project and installs it on every worker; each command may run for
  `timeout` seconds (subprocess.TimeoutExpired)."""
  for cmd in upload_commands(args):
    shell.run(cmd, timeout)
  shell.run(install_command(args), timeout)
  if args.mount_bucket:
    shell.run(mount_command(args), timeout)
