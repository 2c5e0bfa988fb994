"""GenMask in JAX/Flax: a WAN-2.1 DiT fine-tuned to generate segmentation masks and images.

`from genmask_jax import GenMask` gives a trained run as one object (inference/genmask.py). It
is imported on first use, so that light modules (configs, data preparation) import the package
without JAX.
"""

from typing import Any

from genmask_jax.runtime import backends

backends.skip_absent_tpu()  # Before JAX starts a backend; imports no JAX itself.


def __getattr__(name: str) -> Any:
  if name == "GenMask":
    from genmask_jax.inference.genmask import GenMask

    return GenMask
  raise AttributeError(f"module 'genmask_jax' has no attribute {name!r}")
