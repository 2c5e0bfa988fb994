"""Evaluation: data-parallel one-step segmentation over every device and host (`evaluate`), the
metric definitions (`metrics`), metric sums across devices (`reduce`), results / overlay output
(`report`), the named-colour scores of generated images (`colours`) and the demo's text-blind
baselines (`baselines`)."""
