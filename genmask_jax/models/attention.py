"""Multi-head attention behind one function; the kernel is chosen by name (config).

All implementations take q (B, Lq, H, D), k and v (B, Lk, H, D) and an optional key mask
(B, Lk) (True = attend) and return (B, Lq, H, D) in v's dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


def _xla(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None) -> jax.Array:
  """Reference kernel: fp32 logits and softmax, probabilities cast back to v's dtype."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _jax_nn(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  key_mask: jax.Array | None,
  *,
  implementation: str | None,
) -> jax.Array:
  """`jax.nn.dot_product_attention`; implementation="cudnn" is the fused flash kernel on GPU."""
  mask = None if key_mask is None else key_mask[:, None, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


# Pallas splash attention for TPU registers here under "splash".
IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
  "xla": _xla,
  "cudnn": functools.partial(_jax_nn, implementation="cudnn"),
  "jax_xla": functools.partial(_jax_nn, implementation="xla"),
}


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  key_mask: jax.Array | None = None,
  *,
  impl: str = "xla",
) -> jax.Array:
  """Softmax attention with scale 1/sqrt(head_dim), using the kernel named `impl`."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(
      f"unknown attention implementation {impl!r}; available: {sorted(IMPLEMENTATIONS)}"
    )
  return IMPLEMENTATIONS[impl](q, k, v, key_mask)
