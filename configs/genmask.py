"""GenMask model config: `--config=configs/genmask.py:SIZE`, SIZE in 1.3b|mid|small|tiny.

The paper's setting is 1.3b (the default); the smaller sizes serve benchmarks and tests.
"""

from __future__ import annotations

import ml_collections

from configs import models


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  size = arg or "1.3b"
  config = ml_collections.ConfigDict()
  config.dit = models.wan_dit(size)
  config.vae = models.wan_vae("wan2.1" if size in ("1.3b", "mid") else size)
  return config
