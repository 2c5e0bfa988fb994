"""The attention kernels behind `dot_product_attention` agree with the reference XLA kernel."""

import jax
import numpy as np
import pytest

from genmask_jax.models import attention


def test_kernels_agree_with_key_mask():
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, 5, 2, 8))
  k = jax.random.normal(keys[1], (2, 7, 2, 8))
  v = jax.random.normal(keys[2], (2, 7, 2, 8))
  mask = np.arange(7)[None] < np.array([[4], [7]])
  ref = attention.dot_product_attention(q, k, v, mask, impl="xla")
  np.testing.assert_allclose(
    attention.dot_product_attention(q, k, v, mask, impl="jax_xla"), ref, atol=1e-5
  )
  # Masked keys are ignored: dropping them gives the same result.
  np.testing.assert_allclose(
    attention.dot_product_attention(q[:1], k[:1, :4], v[:1, :4], impl="xla"), ref[:1], atol=1e-6
  )


def test_unknown_kernel_is_an_error():
  x = np.zeros((1, 1, 1, 4), np.float32)
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    attention.dot_product_attention(x, x, x, impl="flash")
