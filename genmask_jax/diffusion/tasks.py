"""Per-sample task ids of a mixed batch; they index per-task settings such as timestep samplers."""

SEGMENTATION = 0
GENERATION = 1
NAMES = ("segmentation", "generation")  # NAMES[task_id]
