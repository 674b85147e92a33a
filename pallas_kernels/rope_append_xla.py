"""Pure-XLA reference of `rope_append`: split the fused q|k|v row, rotate q and k, write k/v at each row's slot."""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.decode_attention_xla import append_kv8_xla, append_kv_xla


def split_fused_qkv(qkv_BN, num_heads: int, num_kv_heads: int, head_dim: int):
  """KV-group-major `[B, Hkv * (G + 2) * D]` (group g: its G query heads, its key, its value) -> q `[B, Hq, D]`,
  k, v `[B, Hkv, D]`."""
  B = qkv_BN.shape[0]
  G = num_heads // num_kv_heads
  y = qkv_BN.reshape(B, num_kv_heads, G + 2, head_dim)
  return y[:, :, :G].reshape(B, num_heads, head_dim), y[:, :, G], y[:, :, G + 1]


def rotate(x_BHD, positions_B, inv_freq_F):
  """Rotate-half RoPE (as Hugging Face) at one position per row; float32 math, x's dtype out."""
  freqs_BF = positions_B.astype(jnp.float32)[:, None] * inv_freq_F[None, :]
  emb_BD = jnp.concatenate([freqs_BF, freqs_BF], axis=-1)
  cos_B1D, sin_B1D = jnp.cos(emb_BD)[:, None], jnp.sin(emb_BD)[:, None]
  xf = x_BHD.astype(jnp.float32)
  half = x_BHD.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos_B1D + rotated * sin_B1D).astype(x_BHD.dtype)


def rope_append_xla(qkv_BN, positions_B, inv_freq_F, k_BHSD, v_BHSD, *, num_heads: int, k_scale_BHS=None,
                    v_scale_BHS=None):
  """Returns `(q_BHD, k_BHSD, v_BHSD)`: q rotated, the rotated key and the value written at slot
  `positions_B[b]` of every group (dropped outside `[0, S)`). `inv_freq_F` None: no rotation (OPT). With an 8-bit
  cache's scales: k and v quantised (`kv_quant.quantise`) and `(q, k, v, k_scale, v_scale)` returned."""
  _, Hkv, _, D = k_BHSD.shape
  q, k, v = split_fused_qkv(qkv_BN, num_heads, Hkv, D)
  if inv_freq_F is not None:
    q, k = rotate(q, positions_B, inv_freq_F), rotate(k, positions_B, inv_freq_F)
  if k_scale_BHS is not None:
    return (q,) + append_kv8_xla(k_BHSD, v_BHSD, k_scale_BHS, v_scale_BHS, k, v, positions_B)
  k_BHSD, v_BHSD = append_kv_xla(k_BHSD, v_BHSD, k, v, positions_B)
  return q, k_BHSD, v_BHSD
