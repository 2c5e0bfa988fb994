"""Pallas splash attention's default tiles (fields of `splash.BlockSizes`), apart from the
kernel so that configs name them without importing JAX; tiles longer than a sequence shrink to
it, rounded up to whole 128-lane vregs (models/attention.py)."""

SPLASH_BLOCK_SIZES = dict(
  block_q=512,
  block_kv=512,
  block_kv_compute=512,
  block_q_dkv=512,
  block_kv_dkv=512,
  block_kv_dkv_compute=512,
  block_q_dq=512,
  block_kv_dq=512,
)
