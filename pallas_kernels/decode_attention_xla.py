"""Pure-XLA selective decode attention: the reference and the non-GPU fallback.

Computes every KV group densely (einsum on the head-major cache) and zeroes the
query heads of unselected groups. Softmax in float32; P is cast to the cache dtype
for the P @ V product, as in flash attention. An 8-bit cache (`pallas_kernels.kv_quant`) is read as the kernels
read it: K and V converted to q's dtype, the scores scaled by each key's scale, P by each value's scale.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import kv_quant

# Finite "minus infinity" used for the running max of empty/unselected heads:
# exp(M_EMPTY - m) is 0 for any real m and M_EMPTY - M_EMPTY is 0 (no NaN).
M_EMPTY = float(-0.7 * np.finfo(np.float32).max)


def selected_heads_mask(group_idx_BK, batch: int, num_kv_heads: int,
                        group_size: int, group_count_B=None):
  """[B, Hq] bool: query head h is computed when its group h // G is selected
  (with `group_count_B`: named by one of row b's first `group_count_B[b]` slots)."""
  if group_count_B is None:
    sel_BHkv = jnp.zeros((batch, num_kv_heads), jnp.bool_)
    sel_BHkv = sel_BHkv.at[jnp.arange(batch)[:, None], group_idx_BK].set(True)
  else:
    counted_BK = count_mask(group_count_B, group_idx_BK.shape[1])
    named_BKH = group_idx_BK[:, :, None] == jnp.arange(num_kv_heads, dtype=jnp.int32)[None, None, :]
    sel_BHkv = jnp.any(named_BKH & counted_BK[:, :, None], axis=1)
  return jnp.repeat(sel_BHkv, group_size, axis=1)


def count_mask(group_count_B, num_slots: int):
  """[B, K] bool: slot j of row b is counted (j < group_count_B[b], the count clamped to [0, K])."""
  count_B = jnp.clip(group_count_B.astype(jnp.int32), 0, num_slots)
  return jnp.arange(num_slots, dtype=jnp.int32)[None, :] < count_B[:, None]


def decode_attention_xla(q_BHD, k_BHSD, v_BHSD, lengths_B, group_idx_BK,
                         kv_start_B, *, scale: float,
                         return_residuals: bool = False, group_count_B=None, k_scale_BHS=None,
                         v_scale_BHS=None):
  """Reference with the same contract as `selective_decode_attention`.

  Args:
    q_BHD: [B, Hq, D] query of the one decode token.
    k_BHSD, v_BHSD: [B, Hkv, S, D] head-major KV cache.
    lengths_B: [B] int32, keys [kv_start, lengths) are attended.
    group_idx_BK: [B, K] int32 selected KV groups (values clamped to [0, Hkv)).
    kv_start_B: [B] int32 first attended key, or None for 0.
    scale: softmax scale applied to q.k.
    return_residuals: return (o_unnormalised, m, l) in float32 instead.
    group_count_B: optional [B] int: row b uses only group_idx_BK[b, :count]
      (clamped to [0, K]); None: every slot.
    k_scale_BHS, v_scale_BHS: float32 [B, Hkv, S] scales of an 8-bit cache, or None.
  """
  B, Hq, D = q_BHD.shape
  _, Hkv, S, _ = k_BHSD.shape
  G = Hq // Hkv
  q_BKGD = q_BHD.reshape(B, Hkv, G, D)
  # float32 inputs: full precision (XLA GPU would otherwise use TF32).
  precision = (jax.lax.Precision.HIGHEST if q_BHD.dtype == jnp.float32
               else None)
  quantised = k_scale_BHS is not None
  if quantised:   # 8-bit values are exact in q's dtype
    k_BHSD, v_BHSD = k_BHSD.astype(q_BHD.dtype), v_BHSD.astype(q_BHD.dtype)
  s_BKGS = jnp.einsum("bkgd,bksd->bkgs", q_BKGD, k_BHSD, precision=precision,
                      preferred_element_type=jnp.float32) * scale
  if quantised:
    s_BKGS = s_BKGS * k_scale_BHS[:, :, None, :]
  pos_S = jnp.arange(S, dtype=jnp.int32)
  lengths_B = jnp.clip(lengths_B.astype(jnp.int32), 0, S)
  valid_BS = pos_S[None, :] < lengths_B[:, None]
  if kv_start_B is not None:
    valid_BS &= pos_S[None, :] >= kv_start_B.astype(jnp.int32)[:, None]
  valid_B11S = valid_BS[:, None, None, :]
  s_BKGS = jnp.where(valid_B11S, s_BKGS, -jnp.inf)
  m_BKG = jnp.max(s_BKGS, axis=-1)
  m_BKG = jnp.where(jnp.isfinite(m_BKG), m_BKG, M_EMPTY)
  p_BKGS = jnp.where(valid_B11S, jnp.exp(s_BKGS - m_BKG[..., None]), 0.0)
  l_BKG = jnp.sum(p_BKGS, axis=-1)
  if quantised:
    p_BKGS = jnp.where(valid_B11S, p_BKGS * v_scale_BHS[:, :, None, :], 0.0)
  o_BKGD = jnp.einsum("bkgs,bksd->bkgd", p_BKGS.astype(v_BHSD.dtype), v_BHSD,
                      precision=precision, preferred_element_type=jnp.float32)

  o_BHD = o_BKGD.reshape(B, Hq, D)
  m_BH = m_BKG.reshape(B, Hq)
  l_BH = l_BKG.reshape(B, Hq)
  if group_idx_BK is not None:
    group_idx_BK = jnp.clip(group_idx_BK.astype(jnp.int32), 0, Hkv - 1)
    sel_BH = selected_heads_mask(group_idx_BK, B, Hkv, G, group_count_B)
    o_BHD = jnp.where(sel_BH[..., None], o_BHD, 0.0)
    m_BH = jnp.where(sel_BH, m_BH, M_EMPTY)
    l_BH = jnp.where(sel_BH, l_BH, 0.0)
  if return_residuals:
    return o_BHD, m_BH, l_BH
  return normalise(o_BHD, l_BH).astype(q_BHD.dtype)


def append_kv_xla(k_BHSD, v_BHSD, k_new_BHD, v_new_BHD, lengths_B):
  """Writes each row's new K/V `[B, Hkv, D]` at slot `lengths_B[b]` of every group (dropped when the slot is
  outside `[0, S)`): one scatter per cache, in place when the caches are donated or dead afterwards."""
  B, Hkv = k_BHSD.shape[:2]
  index = (jnp.arange(B)[:, None], jnp.arange(Hkv)[None, :], lengths_B.astype(jnp.int32)[:, None])
  return (k_BHSD.at[index].set(k_new_BHD.astype(k_BHSD.dtype), mode="drop"),
          v_BHSD.at[index].set(v_new_BHD.astype(v_BHSD.dtype), mode="drop"))


def append_kv8_xla(k_BHSD, v_BHSD, k_scale_BHS, v_scale_BHS, k_new_BHD, v_new_BHD, lengths_B):
  """`append_kv_xla` into an 8-bit cache: the new K/V quantised (`kv_quant.quantise`, one scale per group) and
  written with their scales. Returns `(k_BHSD, v_BHSD, k_scale_BHS, v_scale_BHS)`."""
  kq, ks = kv_quant.quantise(k_new_BHD, k_BHSD.dtype)
  vq, vs = kv_quant.quantise(v_new_BHD, v_BHSD.dtype)
  k_BHSD, v_BHSD = append_kv_xla(k_BHSD, v_BHSD, kq, vq, lengths_B)
  scale_index = (jnp.arange(k_BHSD.shape[0])[:, None], jnp.arange(k_BHSD.shape[1])[None, :],
                 lengths_B.astype(jnp.int32)[:, None])
  return (k_BHSD, v_BHSD, k_scale_BHS.at[scale_index].set(ks, mode="drop"),
          v_scale_BHS.at[scale_index].set(vs, mode="drop"))


def decode_attention_append_xla(q_BHD, k_new_BHD, v_new_BHD, k_BHSD, v_BHSD, lengths_B, group_idx_BK,
                                kv_start_B, *, scale: float, group_count_B=None, k_scale_BHS=None,
                                v_scale_BHS=None):
  """Reference of `selective_decode_attention_append`: `append_kv_xla` (`append_kv8_xla` with scales), then
  attention over `[kv_start, lengths + 1)`. Returns `(out [B, Hq, D], k_BHSD, v_BHSD)`, and the two scales after
  them for an 8-bit cache."""
  if k_scale_BHS is None:
    k_BHSD, v_BHSD = append_kv_xla(k_BHSD, v_BHSD, k_new_BHD, v_new_BHD, lengths_B)
  else:
    k_BHSD, v_BHSD, k_scale_BHS, v_scale_BHS = append_kv8_xla(k_BHSD, v_BHSD, k_scale_BHS, v_scale_BHS,
                                                              k_new_BHD, v_new_BHD, lengths_B)
  out = decode_attention_xla(q_BHD, k_BHSD, v_BHSD, lengths_B.astype(jnp.int32) + 1, group_idx_BK, kv_start_B,
                             scale=scale, group_count_B=group_count_B, k_scale_BHS=k_scale_BHS,
                             v_scale_BHS=v_scale_BHS)
  if k_scale_BHS is None:
    return out, k_BHSD, v_BHSD
  return out, k_BHSD, v_BHSD, k_scale_BHS, v_scale_BHS


def normalise(o_BHD, l_BH):
  """o / l with 0 where l == 0 (unselected heads, empty rows)."""
  safe_l_BH = jnp.where(l_BH > 0, l_BH, 1.0)
  return jnp.where((l_BH > 0)[..., None], o_BHD / safe_l_BH[..., None], 0.0)


def merge_partials(parts):
  """Merges [(o_unnormalised, m, l), ...] (same shapes) into o/l in float32."""
  m_all = jnp.stack([m for _, m, _ in parts])
  m_max = jnp.max(m_all, axis=0)
  o_sum = 0.0
  l_sum = 0.0
  for o, m, l in parts:
    w = jnp.exp(m.astype(jnp.float32) - m_max)
    o_sum = o_sum + o.astype(jnp.float32) * w[..., None]
    l_sum = l_sum + l.astype(jnp.float32) * w
  return normalise(o_sum, l_sum)


def decode_attention_xla_gather(q_BHD, k_BHSD, v_BHSD, lengths_B, group_idx_BK,
                                kv_start_B, *, scale: float,
                                return_residuals: bool = False):
  """Gather-then-attend variant (copies the selected K/V groups first).

  Same contract as `decode_attention_xla`; group_idx_BK must not be None. Cheaper
  than the dense reference on CPU, slower on GPU (the copy costs a KV pass).
  """
  B, Hq, D = q_BHD.shape
  _, Hkv, S, _ = k_BHSD.shape
  G = Hq // Hkv
  K = group_idx_BK.shape[1]
  gidx_BK = jnp.clip(group_idx_BK.astype(jnp.int32), 0, Hkv - 1)
  q_BKGD = jnp.take_along_axis(q_BHD.reshape(B, Hkv, G, D),
                               gidx_BK[:, :, None, None], axis=1)
  k_BKSD = jnp.take_along_axis(k_BHSD, gidx_BK[:, :, None, None], axis=1)
  v_BKSD = jnp.take_along_axis(v_BHSD, gidx_BK[:, :, None, None], axis=1)
  o_sel, m_sel, l_sel = decode_attention_xla(
      q_BKGD.reshape(B, K * G, D), k_BKSD, v_BKSD, lengths_B, None, kv_start_B,
      scale=scale, return_residuals=True)
  rows_B1 = jnp.arange(B)[:, None]
  o_BKGD = jnp.zeros((B, Hkv, G, D), jnp.float32).at[rows_B1, gidx_BK].set(
      o_sel.reshape(B, K, G, D))
  m_BKG = jnp.full((B, Hkv, G), M_EMPTY, jnp.float32).at[rows_B1, gidx_BK].set(
      m_sel.reshape(B, K, G))
  l_BKG = jnp.zeros((B, Hkv, G), jnp.float32).at[rows_B1, gidx_BK].set(
      l_sel.reshape(B, K, G))
  o_BHD, m_BH, l_BH = (o_BKGD.reshape(B, Hq, D), m_BKG.reshape(B, Hq),
                       l_BKG.reshape(B, Hq))
  if return_residuals:
    return o_BHD, m_BH, l_BH
  return normalise(o_BHD, l_BH).astype(q_BHD.dtype)
