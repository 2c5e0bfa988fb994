"""Shared test set-up: CPU only, no network, deterministic torch."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Eight fake CPU devices for sharding tests.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import torch  # noqa: E402
from absl import flags  # noqa: E402

# grain worker processes read absl flags.
flags.FLAGS.mark_as_parsed()
torch.set_num_threads(2)
