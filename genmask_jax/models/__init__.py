"""Flax (linen) models: the WAN-2.1 DiT and VAE, attention, RoPE."""
