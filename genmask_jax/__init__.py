"""GenMask in JAX/Flax: a WAN-2.1 DiT fine-tuned to generate segmentation masks and images."""

from genmask_jax.runtime import backends

backends.skip_absent_tpu()
