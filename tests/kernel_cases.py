"""Helpers shared by the decode-attention kernel tests: per-dtype tolerances and the closeness check."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# (rtol, atol as a fraction of max|ref|) of an attention output in each dtype vs its XLA reference.
ATTENTION_TOL = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (2e-2, 1e-2), jnp.float16: (5e-3, 2e-3)}


def assert_attention_close(out, ref, dtype) -> None:
  """`out` is finite and equals `ref` within `ATTENTION_TOL[dtype]` (atol scaled by max(1, max|ref|))."""
  rtol, atol = ATTENTION_TOL[dtype]
  out, ref = np.asarray(out.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol * max(1.0, np.abs(ref).max()))


# 8-bit KV caches (`pallas_kernels.kv_quant`): every kernel test that takes a cache runs on each storage dtype.
KV8_DTYPES = (jnp.int8, jnp.float8_e4m3fn)


def quantise_cache(cache_bhsd, kv_dtype):
  """`(values, scale)` of a float cache stored in `kv_dtype`; `(cache, None)` for None (the float cache)."""
  from pallas_kernels import kv_quant
  if kv_dtype is None:
    return cache_bhsd, None
  return kv_quant.quantise(cache_bhsd, kv_dtype)


def poison_slots(values_bhsd, scale_bhs, dead_bhs):
  """NaN in every dead (row, group, slot) of an 8-bit cache: its scale (int8 has no NaN) and, for float8, its
  values too."""
  scale_bhs = jnp.where(dead_bhs, jnp.nan, scale_bhs)
  if jnp.issubdtype(values_bhsd.dtype, jnp.floating):
    values_bhsd = jnp.where(dead_bhs[..., None], jnp.asarray(np.nan, values_bhsd.dtype), values_bhsd)
  return values_bhsd, scale_bhs
