"""The online-softmax step shared by the decode attention kernels (direct, split-K and persistent)."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def precision(a):
  """IEEE float32 dots for float32 inputs (Triton's default would be TF32)."""
  return lax.Precision.HIGHEST if a.dtype == jnp.float32 else None


def online_softmax_step(carry, q_gd, k_kd, v_kd, ok_k, scale: float, k_scale_k=None, v_scale_k=None):
  """Folds one key block into `carry = (o_gd unnormalised float32, m_g, l_g)`: scores q.k * scale in float32
  (keys where `ok_k` is False masked; None: all valid), p cast to v's dtype for the p.v product.

  8-bit K/V (`pallas_kernels.kv_quant`): with `k_scale_k` / `v_scale_k` (float32 `[block_k]`), k and v are converted
  to q's dtype in registers (exact for int8 and float8_e4m3fn), the scores are multiplied by each key's scale and
  the softmax weights by each value's scale before the p.v product (l sums the unscaled weights). Masked keys'
  scales must be finite (their loads' fill value)."""
  o_gd, m_g, l_g = carry
  if k_scale_k is not None:
    k_kd = k_kd.astype(q_gd.dtype)
  s_gk = lax.dot_general(q_gd, k_kd, (((1,), (1,)), ((), ())), precision=precision(k_kd),
                         preferred_element_type=jnp.float32) * scale
  if k_scale_k is not None:
    s_gk = s_gk * k_scale_k[None, :]
  if ok_k is not None:
    s_gk = jnp.where(ok_k[None, :], s_gk, -jnp.inf)
  m_new_g = jnp.maximum(m_g, jnp.max(s_gk, axis=1))
  alpha_g = jnp.exp(m_g - m_new_g)
  p_gk = jnp.exp(s_gk - m_new_g[:, None])
  l_g = l_g * alpha_g + jnp.sum(p_gk, axis=1)
  pv_gk = p_gk
  if v_scale_k is not None:
    v_kd = v_kd.astype(q_gd.dtype)
    pv_gk = p_gk * v_scale_k[None, :]
  o_gd = o_gd * alpha_g[:, None] + lax.dot_general(
      pv_gk.astype(v_kd.dtype), v_kd, (((1,), (0,)), ((), ())), precision=precision(v_kd),
      preferred_element_type=jnp.float32)
  return o_gd, m_new_g, l_g
