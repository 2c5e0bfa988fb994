"""Commands of the cluster launchers: built as argument lists, shown shell-quoted, run or not;
and the launchers' flag parsing.

Everything a launcher does outside Python goes through `Shell`, so a dry run prints exactly
what a real run would execute (as lines that can be pasted into bash) and starts no process.
A launcher whose `main(argv)` tests call in-process defines its absl flags in a FlagValues of
its own (`parse`), apart from the global FLAGS and from other launchers' flags of one name.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import re
import shlex
import subprocess
import sys
import types
from collections.abc import Sequence
from typing import NoReturn

from absl import flags

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
ENV_NAME = re.compile(r"[A-Za-z_]\w*")
_HEREDOC_END = "GENMASK_EOF"
_HELP = ("--help", "-help", "-h", "--helpshort")

Flags = types.SimpleNamespace  # A launcher's parsed flags by name (and what it derives).


def definers(values: flags.FlagValues) -> Flags:
  """absl's DEFINE_* functions defining into `values`; `bool` defaults to False, `multi` (a
  repeatable string) to []."""
  bind = lambda define, **defaults: functools.partial(define, flag_values=values, **defaults)
  return Flags(
    string=bind(flags.DEFINE_string),
    integer=bind(flags.DEFINE_integer),
    float=bind(flags.DEFINE_float),
    bool=bind(flags.DEFINE_bool, default=False),
    multi=bind(flags.DEFINE_multi_string, default=[]),
    enum=bind(flags.DEFINE_enum),
    list=bind(flags.DEFINE_list),
  )


def usage_error(message: str) -> NoReturn:
  """Exits 2 with `message` on stderr, as a flag parser does."""
  print(f"error: {message} (see --help)", file=sys.stderr)
  raise SystemExit(2)


def parse(values: flags.FlagValues, argv: Sequence[str], doc: str) -> list[str]:
  """Parses argv into `values`, reset to their defaults first (main() may run again in one
  process); returns the positional arguments. --help prints `doc` and the flags, and exits.
  A list flag also takes its values space-separated, `--splits a b` for `--splits=a,b`."""
  if any(arg in _HELP for arg in argv):
    own = [module for module in values.flags_by_module_dict() if module != "absl.flags"]
    print(f"{doc}\nflags:\n" + "\n".join(values.module_help(m) for m in own) + "\n")
    raise SystemExit(0)
  lists = {f"--{name}" for name in values if isinstance(values[name].parser, flags.ListParser)}
  joined, i = [], 0
  while i < len(argv):
    arg, i = argv[i], i + 1
    if arg in lists:
      items = list(itertools.takewhile(lambda a: not a.startswith("-"), argv[i:]))
      arg, i = f"{arg}={','.join(items)}", i + len(items)
    joined.append(arg)
  values.unparse_flags()
  try:
    return values(["launcher", *joined])[1:]
  except flags.Error as e:
    usage_error(str(e))


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

  def run(self, cmd: Sequence[str], timeout: float | None = None) -> None:
    """Runs cmd with its output streaming to ours; a non-zero exit raises CalledProcessError,
    running longer than `timeout` seconds TimeoutExpired (the command is killed)."""
    self._show(shlex.join(cmd))
    if not self.dry_run:
      subprocess.run(list(cmd), check=True, timeout=timeout)

  def read(self, cmd: Sequence[str], timeout: float | None = None) -> str:
    """Stdout of a query command (errors as `run`'s; a CalledProcessError keeps the stdout).
    Queries have no dry-run answer: callers branch before."""
    if self.dry_run:
      raise RuntimeError(f"dry run cannot read the output of {shlex.join(cmd)}")
    self._show(shlex.join(cmd))
    return subprocess.run(
      list(cmd), check=True, capture_output=True, text=True, timeout=timeout
    ).stdout

  def check(self, cmd: Sequence[str], cwd: str | None = None) -> None:
    """Runs a local check that changes nothing, in a dry run too, so that a dry run refuses
    what a real run would; a non-zero exit raises CalledProcessError."""
    self.note(f"checking: {shlex.join(cmd)}")
    subprocess.run(list(cmd), check=True, cwd=cwd)

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
