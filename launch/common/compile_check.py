"""The pod launchers' compile check: a job's steps compiled for its TPU slices on this machine
(launch/compile.py, no TPU needed) before anything is created, queued or submitted."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from launch.common import commands


def compile_command(
  args: commands.Flags, steps: Sequence[str] = ("train", "segment"), num_slices: int = 1
) -> list[str]:
  """launch/compile.py for the job: by default its train and segmentation (evaluation) steps."""
  overrides = commands.assignments(args.config_overrides, "--config_overrides", commands.CONFIG_KEY)
  slices = [f"--num_slices={num_slices}"] if num_slices > 1 else []
  return [
    sys.executable,
    "-m",
    "launch.compile",
    f"--config={args.config}",
    f"--topology={args.accelerator_type}",
    *slices,
    f"--steps={','.join(steps)}",
    *(f"--config.{name}={value}" for name, value in overrides),
  ]


def check_compiles(
  shell: commands.Shell,
  args: commands.Flags,
  steps: Sequence[str] = ("train", "segment"),
  num_slices: int = 1,
  checkout: str | None = None,
) -> None:
  """Compiles the job for its slices first, in `checkout` (default: this one), whose config
  files the workers run; exits 1 naming the reason when it does not compile or fit, unless
  --skip_compile_check."""
  if args.skip_compile_check:
    shell.note("compile check skipped (--skip_compile_check)")
    return
  try:  # The config path is relative to the checkout.
    shell.check(compile_command(args, steps, num_slices), cwd=checkout or commands.PROJECT_ROOT)
  except subprocess.CalledProcessError:
    slices = f"{num_slices} x " if num_slices > 1 else ""
    print(
      f"error: {args.config} does not compile or does not fit {slices}{args.accelerator_type} "
      "(see launch.compile's report above); nothing was created or queued. Change the knobs it "
      "names, or pass --skip_compile_check to queue regardless.",
      file=sys.stderr,
    )
    raise SystemExit(1) from None
