"""GenMask in JAX/Flax: a WAN-2.1 DiT fine-tuned to generate segmentation masks and images.

`from genmask_jax import GenMask` gives a trained run as one object (inference/genmask.py), and
`VLM` the Qwen2.5-VL that encodes its texts in-process (vlm/in_process.py). They are imported on
first use, so that light modules (configs, data preparation) import the package without JAX.
"""

from typing import Any

from genmask_jax.runtime import backends

backends.skip_absent_tpu()  # Before JAX starts a backend; imports no JAX itself.


def __getattr__(name: str) -> Any:
  if name == "GenMask":
    from genmask_jax.inference.genmask import GenMask

    return GenMask
  if name == "VLM":
    from genmask_jax.vlm.in_process import VLM

    return VLM
  raise AttributeError(f"module 'genmask_jax' has no attribute {name!r}")
