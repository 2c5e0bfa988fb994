"""GenMask in JAX/Flax: a WAN-2.1 DiT fine-tuned to generate segmentation masks and images."""
