"""The two tasks: ids (static arguments of the train step and the loss) and names (data config
sections, sample records, timestep samplers, metrics)."""

SEGMENTATION = 0
GENERATION = 1
NAMES = ("segmentation", "generation")  # NAMES[task_id]
