"""Pure-XLA reference of `skinny_matmul`: what `polar_jax.layers.Linear` computes, plus the residual add."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def skinny_matmul_xla(x_MK, w_KN, bias_N=None, residual_MN=None, *, out_dtype=None):
  """`y = x @ w` in float32 (IEEE float32 products for float32 inputs) (+ bias), cast to `out_dtype` (w's dtype by default); with a residual, `residual + y`
  in `out_dtype` (as the model's `h + o_proj(ctx)`)."""
  out_dtype = jnp.dtype(out_dtype or w_KN.dtype)
  precision = jax.lax.Precision.HIGHEST if w_KN.dtype == jnp.float32 else None   # IEEE float32, not TF32
  y = jnp.dot(x_MK.astype(w_KN.dtype), w_KN, preferred_element_type=jnp.float32, precision=precision)
  if bias_N is not None:
    y = y + bias_N.astype(jnp.float32)
  y = y.astype(out_dtype)
  return y if residual_MN is None else residual_MN.astype(out_dtype) + y
