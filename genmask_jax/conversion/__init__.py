"""PyTorch checkpoint files (original WAN and diffusers layouts) to Flax parameter trees."""
