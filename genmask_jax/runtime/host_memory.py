"""Transparent huge pages for XLA's CPU buffers, which cost a third of a CPU step without them.

XLA:CPU takes each step's temporaries (~185 MB for the demo's train step) from malloc, and
glibc serves any block over 32 MB with a fresh mmap that it unmaps on free: every step faults in
and zeroes ~45,000 pages of 4 KB again (measured: 90 of the step's 300 CPU milliseconds in the
kernel). glibc's `glibc.malloc.hugetlb=1` tunable marks such blocks for 2 MB transparent huge
pages (the kernel's "madvise" mode, the usual default): the demo's DiT step 160 -> 125 ms on 2
cores, its results bitwise the same (`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` or `=1` before
`python -m benchmarks.demo_step` measures each). glibc reads tunables only when a process
starts, hence the restart.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"


def restart_with_huge_pages() -> None:
  """Restarts this process, same command line, with `GLIBC_TUNABLES` asking for huge pages.

  Call first thing in an entry point's `__main__`. A no-op off glibc Linux and where the tunable
  is already set: `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` keeps 4 KB pages.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or TUNABLE in tunables:
    return
  env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, (tunables, f"{TUNABLE}=1"))))
  print(f"restarting with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (huge pages)", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
