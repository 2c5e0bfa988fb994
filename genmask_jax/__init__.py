"""GenMask in JAX/Flax: a WAN-2.1 DiT fine-tuned to generate segmentation masks and images.

`from genmask_jax import GenMask` gives a trained run as one object (inference/genmask.py). It
is imported on first use, so that light modules (configs, data preparation) import the package
without JAX.
"""

from typing import Any


def __getattr__(name: str) -> Any:
  if name == "GenMask":
    from genmask_jax.inference.genmask import GenMask

    return GenMask
  raise AttributeError(f"module 'genmask_jax' has no attribute {name!r}")
