"""8-bit KV cache storage: symmetric quantisation with one float32 scale per (row, KV group, slot).

A token's key (or value) vector of one KV group is stored as `round(x / scale)` in int8 or `x / scale` in
float8_e4m3fn, with `scale = max|x| / QMAX` computed when the token is written (dynamic: no calibration, and a
token's scale never changes afterwards). Decode attention dequantises in registers: the scores of key s are
multiplied by `k_scale[s]`, and the softmax weight of s by `v_scale[s]` before the P @ V product, so a kernel reads
D + 4 bytes per (key, group) instead of 2 D. The same jnp code runs inside the Triton kernels (rounding as
round-half-away-from-zero: Triton has no round-to-nearest-even op) and in the XLA references, so both write
identical caches.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# The largest magnitude each 8-bit storage dtype represents (symmetric: int8 uses [-127, 127]).
QMAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}
KV8_DTYPES = ("int8", "float8_e4m3fn")
SCALE_DTYPE = jnp.float32


def is_8bit(dtype) -> bool:
  """Whether `dtype` is one of the 8-bit KV storage dtypes (int8, float8_e4m3fn)."""
  return jnp.dtype(dtype) in QMAX


def quantise(x_nd: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """`(values_nd in dtype, scale_n float32)`: each vector along the last axis scaled so that its largest magnitude
  is `QMAX[dtype]` (all-zero vectors: scale 0, values 0)."""
  qmax = QMAX[jnp.dtype(dtype)]
  x = x_nd.astype(jnp.float32)
  scale_n = jnp.max(jnp.abs(x), axis=-1) / qmax
  y = x / jnp.where(scale_n > 0, scale_n, 1.0)[..., None]
  y = jnp.minimum(jnp.maximum(y, -qmax), qmax)
  if jnp.issubdtype(dtype, jnp.integer):
    y = jnp.where(y >= 0, y + 0.5, y - 0.5)   # the cast truncates: round half away from zero
  return y.astype(dtype), scale_n.astype(SCALE_DTYPE)


def dequantise(values_nd: jax.Array, scale_n: jax.Array, dtype) -> jax.Array:
  """`values * scale` in `dtype` (float32 math)."""
  return (values_nd.astype(jnp.float32) * scale_n.astype(jnp.float32)[..., None]).astype(dtype)


def check_scales(name: str, values_bhsd: jax.Array, scale_bhs) -> None:
  """ValueError unless an 8-bit cache comes with float32 scales of its `[..., S]` shape, and a float cache without."""
  if is_8bit(values_bhsd.dtype):
    if scale_bhs is None:
      raise ValueError(f"{name} is {values_bhsd.dtype}: pass its scales ({name}_scale, float32 "
                       f"{values_bhsd.shape[:-1]})")
    if scale_bhs.shape != values_bhsd.shape[:-1] or scale_bhs.dtype != SCALE_DTYPE:
      raise ValueError(f"{name}_scale must be float32 {values_bhsd.shape[:-1]} (one scale per token and KV group), "
                       f"got {scale_bhs.dtype} {scale_bhs.shape}")
  elif scale_bhs is not None:
    raise ValueError(f"{name}_scale is given but {name} is {values_bhsd.dtype}, not an 8-bit dtype "
                     f"({', '.join(KV8_DTYPES)})")
