"""The restart that gives XLA's CPU buffers transparent huge pages (runtime/host_memory.py)."""

import os
import subprocess
import sys

import pytest

from genmask_jax.runtime import host_memory

# Prints the tunables the process ended up with, and how many times its body ran.
PROGRAM = (
  "import os, sys; from genmask_jax.runtime import host_memory; "
  "host_memory.restart_with_huge_pages(); print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])"
)


def run(tunables: str | None) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  command = [sys.executable, "-c", PROGRAM, "--flag=x"]
  return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=True)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables exist on Linux only")
def test_restarts_once_with_the_tunable_and_the_same_command_line():
  result = run(None)
  assert result.stdout.split("\n")[:-1] == ["glibc.malloc.hugetlb=1 ['--flag=x']"]
  assert result.stderr.count("restarting with GLIBC_TUNABLES=glibc.malloc.hugetlb=1") == 1


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables exist on Linux only")
def test_keeps_other_tunables_and_a_users_choice():
  assert run("glibc.malloc.arena_max=2").stdout.startswith(
    "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1 "
  )
  kept = run("glibc.malloc.hugetlb=0")  # Opting out: no restart.
  assert kept.stdout.startswith("glibc.malloc.hugetlb=0 ") and "restarting" not in kept.stderr


def test_a_no_op_where_the_tunable_is_set(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  monkeypatch.setattr(os, "execve", lambda *a: pytest.fail(f"restarted: {a}"))
  host_memory.restart_with_huge_pages()
