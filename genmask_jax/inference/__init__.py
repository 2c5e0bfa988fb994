"""Using a trained run: `GenMask` (genmask.py) opens its directory and segments, generates and
evaluates."""
