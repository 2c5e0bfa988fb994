"""Using a trained run: `GenMask` (genmask.py) opens its directory and segments, generates and
evaluates; its queries (queries.py) are records and text features, prepared as training does."""
