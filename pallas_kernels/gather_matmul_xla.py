"""Pure-XLA gathered matmuls: the reference and the non-GPU fallback.

`jnp.take` copies the selected weight rows, then a dense matmul in float32
accumulation. Padded index positions (>= count) are masked.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

ACTIVATIONS = (None, "relu", "gelu", "silu")


def apply_activation(y, activation: str | None):
  """Activation on float32 values ("gelu" is the exact erf form)."""
  if activation is None:
    return y
  if activation == "relu":
    return jnp.maximum(y, 0.0)
  if activation == "gelu":
    return jax.nn.gelu(y, approximate=False)
  if activation == "silu":
    return y * jax.nn.sigmoid(y)
  raise ValueError(f"unknown activation {activation!r}")


def _precision(a):
  """float32 inputs: full precision (XLA GPU would otherwise use TF32)."""
  return jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None


def _live_mask(k: int, count):
  if count is None:
    return None
  return jnp.arange(k, dtype=jnp.int32) < jnp.reshape(count, ()).astype(jnp.int32)


def gather_matmul_cols_xla(x_Md, w_in_Nd, idx_k, bias_N=None, activation=None,
                           *, count=None):
  """act(x @ w_in[idx].T + bias[idx]) -> [M, k] in x's dtype; 0 at idx >= count."""
  idx_k = jnp.clip(idx_k.astype(jnp.int32), 0, w_in_Nd.shape[0] - 1)
  w_kd = jnp.take(w_in_Nd, idx_k, axis=0)
  y_Mk = jnp.einsum("md,kd->mk", x_Md, w_kd, precision=_precision(x_Md),
                    preferred_element_type=jnp.float32)
  if bias_N is not None:
    y_Mk = y_Mk + jnp.take(bias_N, idx_k).astype(jnp.float32)[None, :]
  y_Mk = apply_activation(y_Mk, activation)
  live_k = _live_mask(idx_k.shape[0], count)
  if live_k is not None:
    y_Mk = jnp.where(live_k[None, :], y_Mk, 0.0)
  return y_Mk.astype(x_Md.dtype)


def gather_matmul_rows_xla(h_Mk, w_out_Nd, idx_k, bias_d=None, *, count=None):
  """h @ w_out[idx] + bias -> [M, d] in h's dtype; positions >= count skipped."""
  idx_k = jnp.clip(idx_k.astype(jnp.int32), 0, w_out_Nd.shape[0] - 1)
  w_kd = jnp.take(w_out_Nd, idx_k, axis=0)
  live_k = _live_mask(idx_k.shape[0], count)
  if live_k is not None:
    h_Mk = jnp.where(live_k[None, :], h_Mk, jnp.zeros((), h_Mk.dtype))
  y_Md = jnp.einsum("mk,kd->md", h_Mk, w_kd, precision=_precision(h_Mk),
                    preferred_element_type=jnp.float32)
  if bias_d is not None:
    y_Md = y_Md + bias_d.astype(jnp.float32)[None, :]
  return y_Md.astype(h_Mk.dtype)
