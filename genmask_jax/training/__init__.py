"""Training: the sharded train step and loop (`train`), optimizer, metrics output, preemption,
the latent-precompute stage (`precompute_latents`) and the demo's VAE training."""
