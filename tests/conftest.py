"""Shared test set-up: CPU only, no network, deterministic torch."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from absl import flags  # noqa: E402

# grain worker processes read absl flags.
flags.FLAGS.mark_as_parsed()
torch.set_num_threads(2)
