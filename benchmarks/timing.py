"""Wall-clock timing shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def median_seconds(run: Callable[[], object], repeats: int) -> float:
  """Median wall time of `run()` over `repeats` calls, after one warm-up call (compilation).

  `run` must block until its work is done (e.g. `block_until_ready()`).
  """
  run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return float(np.median(times))
