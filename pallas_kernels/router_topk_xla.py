"""Pure-XLA reference of `router_topk`: the head router's scores, then each row's top-k group indices."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def router_scores_xla(x_BD, w_DG, b_G):
  """float32 `[B, G]`: x @ w + b in the weight's dtype with float32 accumulation (IEEE float32 products for
  float32 weights)."""
  precision = jax.lax.Precision.HIGHEST if w_DG.dtype == jnp.float32 else None
  return jnp.dot(x_BD.astype(w_DG.dtype), w_DG, preferred_element_type=jnp.float32,
                 precision=precision) + b_G.astype(jnp.float32)


def router_topk_xla(x_BD, w_DG, b_G, *, k: int):
  """int32 `[B, k]`: `lax.top_k(router_scores_xla(...), k)[1]` (descending score, ties lower index first)."""
  return jax.lax.top_k(router_scores_xla(x_BD, w_DG, b_G), k)[1].astype(jnp.int32)
