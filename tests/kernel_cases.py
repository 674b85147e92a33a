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
