"""Pure-XLA reference of `skinny_matmul`: what `polar_jax.layers.Linear` computes, plus the residual add."""
from __future__ import annotations

import jax
import jax.numpy as jnp

GLU_ACTIVATIONS = {"silu": jax.nn.silu}


def skinny_matmul_xla(x_MK, w_KN, bias_N=None, residual_MN=None, *, out_dtype=None, side_w_KP=None, side_b_P=None,
                      glu: str | None = None):
  """`y = x @ w` in float32 (IEEE float32 products for float32 inputs) (+ bias), cast to `out_dtype` (w's dtype
  by default); with a residual, `residual + y` in `out_dtype` (as the model's `h + o_proj(ctx)`). With
  `side_w_KP`, also returns float32 `x @ side_w + side_b` of the same x: `(y, side)`. With `glu` ("silu"), w's
  columns are neuron-interleaved (gate, up) pairs (`polar_jax.fusion.fuse_gate_up`) and y is `silu(gate) * up`
  (N / 2 wide), computed in float32."""
  out_dtype = jnp.dtype(out_dtype or w_KN.dtype)
  y = _dot(x_MK, w_KN)
  if bias_N is not None:
    y = y + bias_N.astype(jnp.float32)
  if glu is not None:     # neuron-interleaved (gate, up) columns -> act(gate) * up
    pairs = y.reshape(*y.shape[:-1], -1, 2)
    y = GLU_ACTIVATIONS[glu](pairs[..., 0]) * pairs[..., 1]
  y = y.astype(out_dtype)
  y = y if residual_MN is None else residual_MN.astype(out_dtype) + y
  if side_w_KP is None:
    return y
  side = _dot(x_MK, side_w_KP)
  return y, side if side_b_P is None else side + side_b_P.astype(jnp.float32)


def _dot(x, w):
  precision = jax.lax.Precision.HIGHEST if w.dtype == jnp.float32 else None   # IEEE float32, not TF32
  return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32, precision=precision)
