"""The online-softmax step shared by the decode attention kernels (direct, split-K and persistent)."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def precision(a):
  """IEEE float32 dots for float32 inputs (Triton's default would be TF32)."""
  return lax.Precision.HIGHEST if a.dtype == jnp.float32 else None


def online_softmax_step(carry, q_gd, k_kd, v_kd, ok_k, scale: float):
  """Folds one key block into `carry = (o_gd unnormalised float32, m_g, l_g)`: scores q.k * scale in float32
  (keys where `ok_k` is False masked; None: all valid), p cast to v's dtype for the p.v product."""
  o_gd, m_g, l_g = carry
  s_gk = lax.dot_general(q_gd, k_kd, (((1,), (1,)), ((), ())), precision=precision(k_kd),
                         preferred_element_type=jnp.float32) * scale
  if ok_k is not None:
    s_gk = jnp.where(ok_k[None, :], s_gk, -jnp.inf)
  m_new_g = jnp.maximum(m_g, jnp.max(s_gk, axis=1))
  alpha_g = jnp.exp(m_g - m_new_g)
  p_gk = jnp.exp(s_gk - m_new_g[:, None])
  l_g = l_g * alpha_g + jnp.sum(p_gk, axis=1)
  o_gd = o_gd * alpha_g[:, None] + lax.dot_general(
      p_gk.astype(v_kd.dtype), v_kd, (((1,), (0,)), ((), ())), precision=precision(v_kd),
      preferred_element_type=jnp.float32)
  return o_gd, m_new_g, l_g
