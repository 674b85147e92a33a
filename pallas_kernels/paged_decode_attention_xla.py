"""Pure-XLA selective paged decode attention: the reference and the non-GPU fallback.

Shape suffixes as in `paged_decode_attention.py`. Gathers each row's pages of its selected groups only into a
contiguous `[B, K, P_row * S_page, D]` copy (keys at or past the row's length zeroed, so stale or unused pages
never reach a product), then runs the contiguous reference (`decode_attention_xla`) on it and places the groups'
outputs at their query heads, zeros elsewhere.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import decode_attention_xla as _xla


def paged_decode_attention_xla(q_bhd, k_pages_hpsd, v_pages_hpsd, lengths_b, page_table_bp, group_idx_bk=None,
                               *, scale: float, k_scale_hps=None, v_scale_hps=None):
  """Reference with the contract of `selective_paged_decode_attention` (inputs validated there); an 8-bit pool's
  scales `[Hkv, P, S_page]` are gathered as its values (zero past each row's length).

  Returns:
    [B, Hq, D] in q's dtype; query heads of unselected groups exactly 0. Page-table entries are clamped to
    [0, P), group ids to [0, Hkv).
  """
  B, Hq, D = q_bhd.shape
  Hkv, P, S_page, _ = k_pages_hpsd.shape
  P_row = page_table_bp.shape[1]
  G = Hq // Hkv
  if group_idx_bk is None:
    group_idx_bk = jnp.broadcast_to(jnp.arange(Hkv, dtype=jnp.int32), (B, Hkv))
  group_idx_bk = jnp.clip(group_idx_bk.astype(jnp.int32), 0, Hkv - 1)
  K = group_idx_bk.shape[1]
  pages_bp = jnp.clip(page_table_bp.astype(jnp.int32), 0, P - 1)
  lengths_b = jnp.clip(lengths_b.astype(jnp.int32), 0, P_row * S_page)
  valid_bs = jnp.arange(P_row * S_page, dtype=jnp.int32)[None, :] < lengths_b[:, None]

  def gather(pages_hps_):
    # [B, K, P_row, S_page(, D)]: row b's pages of its k-th selected group, as one contiguous key axis.
    x = pages_hps_[group_idx_bk[:, :, None], pages_bp[:, None, :]]
    x = x.reshape((B, K, P_row * S_page) + x.shape[4:])
    valid = valid_bs[:, None, :, None] if x.ndim == 4 else valid_bs[:, None, :]
    return jnp.where(valid, x, jnp.zeros((), x.dtype))

  scales = {}
  if k_scale_hps is not None:
    scales = dict(k_scale_BHS=gather(k_scale_hps), v_scale_BHS=gather(v_scale_hps))

  q_bkgd = jnp.take_along_axis(q_bhd.reshape(B, Hkv, G, D), group_idx_bk[:, :, None, None], axis=1)
  out_bkgd = _xla.decode_attention_xla(q_bkgd.reshape(B, K * G, D), gather(k_pages_hpsd), gather(v_pages_hpsd),
                                       lengths_b, None, None, scale=scale, **scales).reshape(B, K, G, D)
  out_bhgd = jnp.zeros((B, Hkv, G, D), q_bhd.dtype).at[jnp.arange(B)[:, None], group_idx_bk].set(out_bkgd)
  return out_bhgd.reshape(B, Hq, D)
