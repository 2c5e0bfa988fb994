"""Rectified-flow diffusion for GenMask: timestep samplers, the flow itself, training losses,
one-step segmentation and multi-step image generation.

Time runs from data (t = 0) to noise (t = 1): `x_t = (1 - t) x0 + t eps`, the model predicts
`v = eps - x0` and the DiT is fed `1000 t`. Segmentation and generation samples share this
objective and differ only in how t is drawn (`timesteps.py`), in supervision (`losses.py`) and
in inference (`segment.py` vs `generate.py`).
"""
