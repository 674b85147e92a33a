"""Public selective paged decode attention: validation and dispatch.

Shape suffixes name an array's axes in order:
  b  batch rows (requests)
  h  heads: query heads (Hq) on q and the output, KV heads / groups (Hkv) on the page pools
  p  pages: the pool's pages (P) on the page pools, a row's page slots (P_row) on the page table
  s  token slots within one page (S_page)
  d  head_dim (D)
  k  selected KV groups of a row (K)
  g  query heads of one group (G = Hq // Hkv)
  n  key splits
So `k_pages_hpsd` is [Hkv, P, S_page, D] and `page_table_bp` is [B, P_row].

Layout: per layer, K and V are page pools `[Hkv, P, S_page, D]`, head-major, so one KV group's pages form their own
plane and a program that streams a selected group reads nothing of the others. Row b's token t lives in page
`page_table_bp[b, t // S_page]` at slot `t % S_page` of every group's plane; rows may share pages (a common prefix)
and list them in any order. Only the first `cdiv(lengths_b[b], S_page)` table entries of a row are read.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _platform
from pallas_kernels import kv_quant
from pallas_kernels import paged_decode_attention_triton as _triton
from pallas_kernels import paged_decode_attention_xla as _xla

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _check_int(name: str, x) -> None:
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must have an integer dtype, got {x.dtype}")


def _check_config(config) -> None:
  if config is not None and not isinstance(config, (_triton.PagedAttentionConfig,
                                                    _triton.PagedAttentionHeuristics)):
    raise TypeError(f"config must be a PagedAttentionConfig, a PagedAttentionHeuristics or None, got "
                    f"{type(config).__name__}")


def _validate(q_bhd, k_pages_hpsd, v_pages_hpsd, lengths_b, page_table_bp, group_idx_bk, k_scale=None,
              v_scale=None) -> None:
  if q_bhd.ndim != 3:
    raise ValueError(f"q must be [B, Hq, D], got shape {q_bhd.shape}")
  if k_pages_hpsd.ndim != 4 or v_pages_hpsd.ndim != 4:
    raise ValueError(f"k_pages and v_pages must be [Hkv, num_pages, page_size, D], got shapes "
                     f"{k_pages_hpsd.shape} and {v_pages_hpsd.shape}")
  if k_pages_hpsd.shape != v_pages_hpsd.shape:
    raise ValueError(f"k_pages shape {k_pages_hpsd.shape} != v_pages shape {v_pages_hpsd.shape}")
  B, Hq, D = q_bhd.shape
  Hkv, P, S_page, Dk = k_pages_hpsd.shape
  if Dk != D:
    raise ValueError(f"q {q_bhd.shape} and k_pages {k_pages_hpsd.shape} disagree on head_dim")
  if Hq % Hkv:
    raise ValueError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
  if S_page % 16 or S_page == 0:
    raise ValueError(f"page_size (k_pages.shape[2]) must be a positive multiple of 16, got {S_page}")
  if P == 0:
    raise ValueError("k_pages has no pages")
  kv8 = kv_quant.is_8bit(k_pages_hpsd.dtype) and k_pages_hpsd.dtype == v_pages_hpsd.dtype
  if not kv8 and not q_bhd.dtype == k_pages_hpsd.dtype == v_pages_hpsd.dtype:
    raise ValueError(f"q, k_pages, v_pages dtypes differ: {q_bhd.dtype}, {k_pages_hpsd.dtype}, "
                     f"{v_pages_hpsd.dtype} (the pools: q's dtype, or both one 8-bit dtype {kv_quant.KV8_DTYPES} "
                     "with scales)")
  kv_quant.check_scales("k_pages", k_pages_hpsd, k_scale)
  kv_quant.check_scales("v_pages", v_pages_hpsd, v_scale)
  if q_bhd.dtype not in _FLOAT_DTYPES:
    raise ValueError(f"unsupported dtype {q_bhd.dtype}; use float32, bfloat16 or float16")
  if lengths_b.shape != (B,):
    raise ValueError(f"lengths must have shape ({B},), got {lengths_b.shape}")
  _check_int("lengths", lengths_b)
  if page_table_bp.ndim != 2 or page_table_bp.shape[0] != B or page_table_bp.shape[1] == 0:
    raise ValueError(f"page_table must be [B={B}, max_pages >= 1], got {page_table_bp.shape}")
  _check_int("page_table", page_table_bp)
  P_row = page_table_bp.shape[1]
  if group_idx_bk is not None:
    if group_idx_bk.ndim != 2 or group_idx_bk.shape[0] != B:
      raise ValueError(f"group_idx must be [B={B}, K], got {group_idx_bk.shape}")
    _check_int("group_idx", group_idx_bk)
    K = group_idx_bk.shape[1]
    if not 1 <= K <= Hkv:
      raise ValueError(f"group_idx selects K={K} groups; need 1 <= K <= Hkv={Hkv}")
    if _platform.is_concrete(group_idx_bk):
      g = np.asarray(group_idx_bk)
      if g.min() < 0 or g.max() >= Hkv:
        raise ValueError(f"group_idx values must lie in [0, {Hkv}), got range [{g.min()}, {g.max()}]")
  if _platform.is_concrete(lengths_b):
    n = np.asarray(lengths_b)
    if n.size and (n.min() < 0 or n.max() > P_row * S_page):
      raise ValueError(f"lengths must lie in [0, max_pages * page_size = {P_row * S_page}], got range "
                       f"[{n.min()}, {n.max()}]")
    if _platform.is_concrete(page_table_bp):
      table = np.asarray(page_table_bp)
      used = np.arange(P_row)[None, :] < -(-n[:, None] // S_page)   # the entries a row's keys live in
      bad = used & ((table < 0) | (table >= P))
      if bad.any():
        b, slot = np.argwhere(bad)[0]
        raise ValueError(f"page_table[{b}, {slot}] = {table[b, slot]} holds keys of row {b} (length {n[b]}) but "
                         f"lies outside the pool's pages [0, {P})")


def _resolve_config(config, batch: int, num_selected: int, page_size: int, max_keys: int
                    ) -> _triton.PagedAttentionConfig:
  if isinstance(config, _triton.PagedAttentionConfig):
    return config
  return _triton.choose_config(batch, num_selected, page_size, max_keys,
                               heuristics=config or _triton.PagedAttentionHeuristics())


def selective_paged_decode_attention(q_bhd, k_pages, v_pages, lengths_b, page_table_bp, group_idx_bk=None, *,
                                     scale=None, config=None, implementation=None, k_scale=None, v_scale=None):
  """Decode attention (one query token per row) over the selected KV groups of each row, keys in pages.

  Args:
    q_bhd: [B, Hq, D] query of the current token (bf16, fp16 or float32).
    k_pages, v_pages: [Hkv, num_pages, page_size, D] page pools of one layer, same dtype as q; page_size a
      multiple of 16.
    lengths_b: [B] int, row b attends to its keys [0, lengths_b[b]) (0: the row's output is 0).
    page_table_bp: [B, max_pages] int, row b's token t is in page `page_table_bp[b, t // page_size]`. Entries a
      row's length does not reach are never read (any value). Used entries outside [0, num_pages) raise when
      concrete; under jit they are clamped.
    group_idx_bk: [B, K] int, selected KV groups per row (= heads for MHA), any order, 1 <= K <= Hkv. Query head
      h belongs to group h // (Hq // Hkv). None selects every group (dense). Out-of-range values raise when
      concrete; under jit they are clamped to [0, Hkv).
    scale: softmax scale, default D ** -0.5.
    config: "pallas" only: a `PagedAttentionConfig` (used as given), a `PagedAttentionHeuristics` (rules that
      choose one from the shapes) or None (the default rules).
    implementation: None (pallas on GPU, xla elsewhere), "pallas" (interpret mode off GPU) or "xla".
    k_scale, v_scale: float32 [Hkv, num_pages, page_size], the scales of 8-bit (int8 / float8_e4m3fn) pools
      (`pallas_kernels.kv_quant`: dequantised in registers); None for pools in q's dtype.

  Returns:
    [B, Hq, D] in q's dtype; query heads of unselected groups are exactly 0 (as `selective_decode_attention`).
  """
  impl = _platform.resolve_implementation(implementation)
  lengths_b = jnp.asarray(lengths_b)
  page_table_bp = jnp.asarray(page_table_bp)
  group_idx_bk = None if group_idx_bk is None else jnp.asarray(group_idx_bk)
  _validate(q_bhd, k_pages, v_pages, lengths_b, page_table_bp, group_idx_bk, k_scale, v_scale)
  scales = {} if k_scale is None else dict(k_scale_hps=k_scale, v_scale_hps=v_scale)
  _check_config(config)
  B, _, D = q_bhd.shape
  Hkv, _, page_size, _ = k_pages.shape
  scale = float(D ** -0.5 if scale is None else scale)
  if impl == "xla":
    return _xla_jit(q_bhd, k_pages, v_pages, lengths_b, page_table_bp, group_idx_bk, scale=scale, **scales)
  K = Hkv if group_idx_bk is None else group_idx_bk.shape[1]
  config = _resolve_config(config, B, K, page_size, page_table_bp.shape[1] * page_size)
  return _triton.paged_decode_attention_triton(q_bhd, k_pages, v_pages, lengths_b, page_table_bp, group_idx_bk,
                                               scale=scale, config=config, interpret=_platform.interpret_mode(),
                                               **scales)


_xla_jit = jax.jit(_xla.paged_decode_attention_xla, static_argnames=("scale",))
