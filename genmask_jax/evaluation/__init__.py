"""Evaluation: undoing the input resize on predicted logits (`resize`), data-parallel metric
sums over every device and host (`reduce`) and results / overlay output (`report`). The
metric definitions live in `genmask_jax.metrics`."""
