"""A training run, as training writes it and evaluation and inference read it: its record
(`record`: run.json), its checkpoints (`checkpoints`) and its model (`model`: the trained and
frozen parameters, the jitted segmentation and generation programs)."""
