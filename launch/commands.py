"""Commands of the cluster launchers: built as argument lists, shown shell-quoted, run or not.

Everything a launcher does outside Python goes through `Shell`, so a dry run prints exactly
what a real run would execute (as lines that can be pasted into bash) and starts no process.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
ENV_NAME = re.compile(r"[A-Za-z_]\w*")
_HEREDOC_END = "GENMASK_EOF"


def assignments(items: Sequence[str], flag: str, key: re.Pattern) -> list[tuple[str, str]]:
  """[(KEY, VALUE)] from ["KEY=VALUE", ...], in order; a malformed item names the flag."""
  pairs = []
  for item in items:
    name, sep, value = item.partition("=")
    if not sep or not key.fullmatch(name):
      raise ValueError(f"{flag}: expected KEY=VALUE with KEY like {key.pattern!r}, got {item!r}")
    pairs.append((name, value))
  return pairs


def train_command(python: str, config: str, workdir: str, overrides: Sequence[str]) -> list[str]:
  """The training entry point, run on every host; overrides are "KEY=VALUE" config assignments."""
  pairs = assignments(overrides, "--config_overrides", CONFIG_KEY)
  return [
    python,
    "-m",
    "genmask_jax.main",
    f"--config={config}",
    f"--workdir={workdir}",
    *(f"--config.{name}={value}" for name, value in pairs),
  ]


@dataclasses.dataclass(frozen=True)
class Shell:
  """Runs commands (printing each first), or with `dry_run` only prints them."""

  dry_run: bool

  def run(self, cmd: Sequence[str]) -> None:
    """Runs cmd with its output streaming to ours; a non-zero exit raises CalledProcessError."""
    self._show(shlex.join(cmd))
    if not self.dry_run:
      subprocess.run(list(cmd), check=True)

  def read(self, cmd: Sequence[str]) -> str:
    """Stdout of a query command. Queries have no dry-run answer: callers branch before."""
    if self.dry_run:
      raise RuntimeError(f"dry run cannot read the output of {shlex.join(cmd)}")
    self._show(shlex.join(cmd))
    return subprocess.run(list(cmd), check=True, capture_output=True, text=True).stdout

  def makedirs(self, path: str) -> None:
    self._show(shlex.join(["mkdir", "-p", path]))
    if not self.dry_run:
      os.makedirs(path, exist_ok=True)

  def write(self, path: str, text: str) -> None:
    """Writes a text file; a dry run prints the here-document that would write it."""
    if self.dry_run:
      print(f"cat > {shlex.quote(path)} <<'{_HEREDOC_END}'\n{text.rstrip()}\n{_HEREDOC_END}")
      return
    self.note(f"writing {path}")
    with open(path, "w") as f:
      f.write(text)

  def note(self, text: str) -> None:
    print(f"# {text}", file=sys.stdout if self.dry_run else sys.stderr, flush=True)

  def _show(self, line: str) -> None:
    # A dry run's stdout is the script itself; a real run traces to stderr like `bash -x`.
    if self.dry_run:
      print(line, flush=True)
    else:
      print(f"+ {line}", file=sys.stderr, flush=True)
