"""Evaluation: data-parallel one-step segmentation over every device and host (`evaluate`), the
metric definitions (`metrics`), undoing the input resize on predicted logits (`resize`), metric
sums across devices (`reduce`) and results / overlay output (`report`)."""
