"""Training: the sharded train step and loop, optimizer, checkpoints, metrics output,
preemption, and the demo's VAE pre-training."""
