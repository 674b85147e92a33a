"""Selective paged decode attention as a Pallas kernel on the Triton backend.

Shape suffixes as in `paged_decode_attention.py` (b rows, h heads, p pages, s slots in a page, d head_dim, k selected
groups, g query heads per group, n key splits).

One program per (row b, selected slot j, key split n). It reads its group from `group_idx` inside the kernel and
streams that group's plane of the page pool, `block_k` keys of the row per loop iteration, with all query heads of
the group computed at once (rows padded to >= 16 for the tensor-core dot; padded rows repeat the last real row).
Every selected group's pages are read once.

Power-of-two pages: an outer loop reads the row's page table `table_chunk` slots at a time into registers, and each
block picks its pages from them, so no K/V address depends on a load of the same loop and Triton pipelines the K/V
tiles `num_stages` deep.
- `block_k <= page_size`: a block is one page or part of one, a contiguous [block_k, D] tile.
- `block_k > page_size`: a block is `block_k / page_size` whole pages, gathered by (page, slot) indices.
Other page sizes (multiples of 16): every key lane loads its page index in the loop and the block is gathered, so
blocks and pages need not align. Whole blocks of a row load unmasked; only the row's last, partial block is masked by
the row's length (lanes past it read nothing, so unused pages and the stale tail of the last page never enter the
result).

Unsplit (`num_splits == 1`): the program writes the normalised output in q's dtype straight into `[B, Hkv, G, D]`,
and program (b, 0) writes zeros for the query heads of the groups row b did not select. Split: float32 partials
(o, m, l) of the selected groups, merged in XLA and placed at their groups.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax import lax

from pallas_kernels import _platform
from pallas_kernels import decode_attention_xla as _xla
from pallas_kernels._online_softmax import online_softmax_step
from pallas_kernels._split_k import split_range


@dataclasses.dataclass(frozen=True)
class PagedAttentionConfig:
  """What the paged attention kernel runs with (static: a different config compiles a different program)."""
  block_k: int  # keys per loop iteration (power of two >= 16); == page_size: one contiguous page per block
  num_splits: int = 1  # key splits per (row, group); 1: normalised output in place, no merge after the kernel
  num_warps: int = 4
  num_stages: int = 3
  table_chunk: int = 256  # page-table slots read into registers at a time (power-of-two pages; a power of two)

  def __post_init__(self):
    if self.block_k < 16 or self.block_k != _platform.next_pow2(self.block_k):
      raise ValueError(f"PagedAttentionConfig.block_k must be a power of two >= 16, got {self.block_k}")
    if self.table_chunk < 1 or self.table_chunk != _platform.next_pow2(self.table_chunk):
      raise ValueError(f"PagedAttentionConfig.table_chunk must be a power of two, got {self.table_chunk}")
    for name in ("num_splits", "num_warps", "num_stages"):
      if getattr(self, name) < 1:
        raise ValueError(f"PagedAttentionConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class PagedAttentionHeuristics:
  """How `choose_config` picks a `PagedAttentionConfig` from the static shapes, and the page size a paged cache
  is created with. Measured on an H100 against the contiguous kernel in the same call (`benchmarks/kernels.py
  --only paged`, `docs/performance.md`): 32-token pages streamed one page per iteration with 4 pipeline stages
  reach 0.93-1.00 of the contiguous kernel's time (B 32-64, S 2k-4k, densities 1 / 0.5 / 0.25, MHA and 32/8 GQA),
  16-token pages gathered 64 keys at a time 0.92-1.00.

  Attributes:
    page_size: tokens per page of a new paged cache (a multiple of 16; the kernel takes any such size).
    page_block_min: a power-of-two page of at least this many tokens is one key block (one contiguous page load
      per iteration); smaller pages are gathered `keys_per_block` keys at a time.
    keys_per_block: keys per loop iteration where pages are gathered (64: the contiguous kernel's block for
      bf16 D 128).
    direct_programs_per_sm: selected (row, group) programs per SM from which keys are not split.
    split_target_programs_per_sm: below that, keys are split into about this many programs per SM in all,
      capped so that every split keeps >= `min_blocks_per_split` key blocks of the longest possible row.
    num_warps: the kernel's warps.
    page_block_stages, gathered_stages: software-pipeline depth with page blocks and with gathered blocks.
  """
  page_size: int = 32
  page_block_min: int = 32
  keys_per_block: int = 64
  direct_programs_per_sm: int = 1
  split_target_programs_per_sm: int = 2
  min_blocks_per_split: int = 4
  num_warps: int = 4
  page_block_stages: int = 4
  gathered_stages: int = 3

  def __post_init__(self):
    if self.page_size < 16 or self.page_size % 16:
      raise ValueError(f"PagedAttentionHeuristics.page_size must be a positive multiple of 16, got "
                       f"{self.page_size}")


def choose_config(batch: int, num_selected: int, page_size: int, max_keys: int, num_sms: int | None = None,
                  heuristics: PagedAttentionHeuristics = PagedAttentionHeuristics()) -> PagedAttentionConfig:
  """Block and split choice from the static shapes (`max_keys`: the page table's capacity, pages x page_size).

  A power-of-two page of at least `page_block_min` keys is one block (contiguous page loads); smaller or
  non-power-of-two pages are gathered `keys_per_block` keys at a time. Keys are split only where the B x K
  selected programs leave SMs idle, as in the contiguous kernel.
  """
  h = heuristics
  num_sms = num_sms or _platform.num_sms()
  page_blocks = page_size == _platform.next_pow2(page_size) and page_size >= h.page_block_min
  if page_blocks:
    block_k = page_size
  else:
    block_k = max(16, min(_platform.next_pow2(h.keys_per_block), _platform.next_pow2(max_keys)))
  work = batch * num_selected
  splits = 1
  if work < h.direct_programs_per_sm * num_sms:
    splits = _platform.cdiv(h.split_target_programs_per_sm * num_sms, work)
    splits = max(1, min(splits, _platform.cdiv(max_keys, block_k) // h.min_blocks_per_split))
  return PagedAttentionConfig(block_k=block_k, num_splits=splits, num_warps=h.num_warps,
                              num_stages=h.page_block_stages if page_blocks else h.gathered_stages)


def _kernel(*refs, num_selected: int | None, num_splits: int, scale: float, group_size: int, head_dim: int,
            block_g: int, block_d: int, block_k: int, table_chunk: int, quantised: bool = False):
  """Program (b, j, n): refs = ([gidx_ref [B, K],] len_ref [B], pt_ref [P_row] (row b's page table),
  q_ref [Hq, D] (row b), k_ref/v_ref [Hkv, P, S_page, D] (the pool), [ks_ref/vs_ref [Hkv, P, S_page] (`quantised`:
  an 8-bit pool's scales),] outputs): unsplit, o_ref [Hkv, G, D] of row b; split, o_ref [G, D], m_ref [G], l_ref
  [G] of (b, j, n)."""
  if num_selected is None:
    gidx_ref, (len_ref, pt_ref, q_ref, k_ref, v_ref, *out_refs) = None, refs
  else:
    gidx_ref, len_ref, pt_ref, q_ref, k_ref, v_ref, *out_refs = refs
  scale_refs = None
  if quantised:   # the scales come after the pools, before the outputs
    scale_refs, out_refs = tuple(out_refs[:2]), out_refs[2:]
  b, j, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  num_kv_heads, num_pages, page_size, _ = k_ref.shape
  max_slots = pt_ref.shape[0]
  group = j if gidx_ref is None else jnp.clip(gidx_ref[b, j], 0, num_kv_heads - 1)
  length = jnp.clip(len_ref[b], 0, max_slots * page_size)

  # Padded query rows / head_dim columns index a clamped copy of the last real row / column: they compute
  # duplicates of real values, stored to the same address (no masked store needed).
  rows_g = jnp.minimum(jnp.arange(block_g, dtype=jnp.int32), group_size - 1)
  cols_d = jnp.arange(block_d, dtype=jnp.int32)
  col_ok_d = cols_d < head_dim
  pad_d = block_d != head_dim
  if pad_d:   # (a clamp hides the columns' contiguity from Triton: 2-byte loads instead of 16-byte ones)
    cols_d = jnp.minimum(cols_d, head_dim - 1)
  q_index = ((group * group_size + rows_g)[:, None], cols_d[None, :])
  if pad_d:   # zero q columns past head_dim: the duplicated K columns add nothing to q.k
    q_gd = plgpu.load(q_ref.at[q_index], mask=jnp.broadcast_to(col_ok_d[None, :], (block_g, block_d)), other=0)
  else:
    q_gd = q_ref[q_index]

  lo, hi = split_range((length + block_k - 1) // block_k, split, num_splits)
  full_hi = jnp.maximum(jnp.minimum(hi, length // block_k), lo)
  arange_k = jnp.arange(block_k, dtype=jnp.int32)

  def step(carry, k_kd, v_kd, ok_k, scale_index=None, scale_mask=None):
    """One block; an 8-bit pool's scales at `scale_index` (masked lanes: 0)."""
    scales = (None, None)
    if scale_refs is not None:
      if scale_mask is None:
        scales = tuple(r[scale_index] for r in scale_refs)
      else:
        scales = tuple(plgpu.load(r.at[scale_index], mask=scale_mask, other=0) for r in scale_refs)
    return online_softmax_step(carry, q_gd, k_kd, v_kd, ok_k, scale, *scales)

  def gathered(i, masked):
    """Block i's K/V tiles by (page, slot) indices; masked: lanes at or past the row's length read nothing."""
    pos_k = i * block_k + arange_k
    slot_k = jnp.minimum(pos_k // page_size, max_slots - 1) if masked else pos_k // page_size
    page_k = jnp.clip(pt_ref[slot_k], 0, num_pages - 1)   # clamped: a stale table entry never reads outside
    index = (group, page_k[:, None], (pos_k % page_size)[:, None], cols_d[None, :])
    scale_index = (group, page_k, pos_k % page_size)
    if not masked:
      return k_ref[index], v_ref[index], None, scale_index
    ok_k = pos_k < length
    mask = jnp.broadcast_to(ok_k[:, None], (block_k, block_d))
    return (plgpu.load(k_ref.at[index], mask=mask, other=0.0), plgpu.load(v_ref.at[index], mask=mask, other=0.0), ok_k,
            scale_index, ok_k)

  def chunked_full_blocks(carry):
    """The whole blocks [lo, full_hi) with the row's page table read `table_chunk` slots at a time into registers
    (power-of-two pages): a block's pages are picked from those registers, so its K/V addresses depend on no load
    of the same loop and Triton pipelines them `num_stages` deep (a page index loaded in the loop leaves one
    buffer)."""
    chunk = max(min(table_chunk, _platform.next_pow2(max_slots)), block_k // page_size)
    blocks_per_chunk = chunk * page_size // block_k
    arange_c = jnp.arange(chunk, dtype=jnp.int32)

    def chunk_body(c, carry):
      slots_c = c * chunk + arange_c
      pages_c = plgpu.load(pt_ref.at[jnp.minimum(slots_c, max_slots - 1)], mask=slots_c < max_slots, other=0)
      pages_c = jnp.clip(pages_c, 0, num_pages - 1)   # clamped: a stale table entry never reads outside the pool

      def block_body(i, carry):
        first = i * block_k // page_size - c * chunk   # the block's first page, in the chunk
        if block_k <= page_size:   # one page (or part of one): a contiguous tile
          page = jnp.sum(jnp.where(arange_c == first, pages_c, 0))
          start = (i * block_k) % page_size
          if not pad_d:
            keys = pl.ds(start, block_k)
            return step(carry, k_ref[group, page, keys, :], v_ref[group, page, keys, :], None, (group, page, keys))
          index = (group, page, (start + arange_k)[:, None], cols_d[None, :])
          scale_index = (group, page, start + arange_k)
        else:   # block_k / page_size whole pages, each key lane's page picked from them
          arange_q = jnp.arange(block_k // page_size, dtype=jnp.int32)
          pages_q = jnp.sum(jnp.where(arange_c[None, :] == (first + arange_q)[:, None], pages_c[None, :], 0), axis=1)
          page_k = jnp.sum(jnp.where((arange_k // page_size)[:, None] == arange_q[None, :], pages_q[None, :], 0),
                           axis=1)
          index = (group, page_k[:, None], (arange_k % page_size)[:, None], cols_d[None, :])
          scale_index = (group, page_k, arange_k % page_size)
        return step(carry, k_ref[index], v_ref[index], None, scale_index)

      return lax.fori_loop(jnp.maximum(lo, c * blocks_per_chunk), jnp.minimum(full_hi, (c + 1) * blocks_per_chunk),
                           block_body, carry)

    return lax.fori_loop(lo // blocks_per_chunk, (full_hi + blocks_per_chunk - 1) // blocks_per_chunk, chunk_body,
                         carry)

  def tail_body(i, carry):
    return step(carry, *gathered(i, masked=True))

  init = (jnp.zeros((block_g, block_d), jnp.float32), jnp.full((block_g,), _xla.M_EMPTY, jnp.float32),
          jnp.zeros((block_g,), jnp.float32))
  if page_size == _platform.next_pow2(page_size):
    carry = chunked_full_blocks(init)
  else:   # blocks and pages need not align: each key lane reads its page index in the loop
    carry = lax.fori_loop(lo, full_hi, lambda i, carry: step(carry, *gathered(i, masked=False)), init)
  o_gd, m_g, l_g = lax.fori_loop(full_hi, hi, tail_body, carry)
  unpadded = block_g == group_size and not pad_d

  if num_splits > 1:
    o_ref, m_ref, l_ref = out_refs
    if unpadded:
      o_ref[...], m_ref[...], l_ref[...] = o_gd, m_g, l_g
    else:
      o_ref[rows_g[:, None], cols_d[None, :]] = o_gd
      m_ref[rows_g] = m_g
      l_ref[rows_g] = l_g
    return

  (o_ref,) = out_refs
  out_gd = (o_gd / jnp.where(l_g > 0, l_g, 1.0)[:, None]).astype(o_ref.dtype)   # 0 where nothing was attended
  if unpadded:
    o_ref[group, :, :] = out_gd
  else:
    o_ref[group, rows_g[:, None], cols_d[None, :]] = out_gd
  if num_selected is not None:
    # Zeros for the query heads of row b's unselected groups, by its first slot's program (disjoint from the
    # selected groups that the other programs of the row write: no ordering between them is needed).
    @pl.when(j == 0)
    def _():
      block_h = _platform.next_pow2(num_kv_heads)
      groups_h = jnp.arange(block_h, dtype=jnp.int32)
      chosen_h = groups_h >= num_kv_heads   # padded groups: never stored
      for slot in range(num_selected):     # K scalar reads; K <= Hkv is small
        chosen_h = chosen_h | (groups_h == jnp.clip(gidx_ref[b, slot], 0, num_kv_heads - 1))
      index = (jnp.minimum(groups_h, num_kv_heads - 1)[:, None, None], rows_g[None, :, None],
               cols_d[None, None, :])
      zeros = jnp.zeros((block_h, block_g, block_d), o_ref.dtype)
      plgpu.store(o_ref.at[index], zeros, mask=jnp.broadcast_to((~chosen_h)[:, None, None], zeros.shape))


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def paged_decode_attention_triton(q_bhd, k_pages_hpsd, v_pages_hpsd, lengths_b, page_table_bp, group_idx_bk=None,
                                  *, scale: float, config: PagedAttentionConfig, interpret: bool, k_scale_hps=None,
                                  v_scale_hps=None):
  """Normalised output `[B, Hq, D]` in q's dtype, query heads of unselected groups exactly 0; `group_idx_bk` None
  computes every group. Inputs as `selective_paged_decode_attention` (validated there); `k_scale_hps`,
  `v_scale_hps`: an 8-bit pool's float32 scales `[Hkv, P, S_page]`, or None."""
  B, Hq, D = q_bhd.shape
  Hkv, P, S_page, _ = k_pages_hpsd.shape
  P_row = page_table_bp.shape[1]
  G = Hq // Hkv
  K = None if group_idx_bk is None else group_idx_bk.shape[1]
  NS = config.num_splits
  kernel = functools.partial(
      _kernel, num_selected=K, num_splits=NS, scale=scale, group_size=G, head_dim=D,
      block_g=max(16, _platform.next_pow2(G)), block_d=max(16, _platform.next_pow2(D)), block_k=config.block_k,
      table_chunk=config.table_chunk, quantised=k_scale_hps is not None)
  pool_spec = pl.BlockSpec((Hkv, P, S_page, D), lambda b, j, n: (0, 0, 0, 0))
  in_specs = [pl.BlockSpec((B,), lambda b, j, n: (0,)),
              pl.BlockSpec((None, P_row), lambda b, j, n: (b, 0)),
              pl.BlockSpec((None, Hq, D), lambda b, j, n: (b, 0, 0)),
              pool_spec, pool_spec]
  args = [lengths_b.astype(jnp.int32), page_table_bp.astype(jnp.int32), q_bhd, k_pages_hpsd, v_pages_hpsd]
  if K is not None:
    in_specs.insert(0, pl.BlockSpec((B, K), lambda b, j, n: (0, 0)))
    args.insert(0, group_idx_bk.astype(jnp.int32))
  if k_scale_hps is not None:
    in_specs += [pl.BlockSpec((Hkv, P, S_page), lambda b, j, n: (0, 0, 0))] * 2
    args += [k_scale_hps, v_scale_hps]
  if NS == 1:
    out_specs = pl.BlockSpec((None, Hkv, G, D), lambda b, j, n: (b, 0, 0, 0))
    out_shape = jax.ShapeDtypeStruct((B, Hkv, G, D), q_bhd.dtype)
  else:
    out_specs = [pl.BlockSpec((None, None, None, G, D), lambda b, j, n: (b, j, n, 0, 0)),
                 pl.BlockSpec((None, None, None, G), lambda b, j, n: (b, j, n, 0)),
                 pl.BlockSpec((None, None, None, G), lambda b, j, n: (b, j, n, 0))]
    out_shape = [jax.ShapeDtypeStruct((B, Hkv if K is None else K, NS, G, D), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hkv if K is None else K, NS, G), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hkv if K is None else K, NS, G), jnp.float32)]
  out = pl.pallas_call(
      kernel,
      grid=(B, Hkv if K is None else K, NS),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
      interpret=interpret,
      name="selective_paged_decode_attention",
  )(*args)
  if NS == 1:
    return out.reshape(B, Hq, D)
  # Merge the splits of each selected group, normalise, then place the groups (others exactly 0).
  o_bkngd, m_bkng, l_bkng = out
  m_bkg = jnp.max(m_bkng, axis=2)
  w_bkng = jnp.exp(m_bkng - m_bkg[:, :, None])
  l_bkg = jnp.sum(l_bkng * w_bkng, axis=2)
  o_bkgd = _xla.normalise(jnp.sum(o_bkngd * w_bkng[..., None], axis=2), l_bkg).astype(q_bhd.dtype)
  if K is None:
    return o_bkgd.reshape(B, Hq, D)
  group_idx_bk = jnp.clip(group_idx_bk.astype(jnp.int32), 0, Hkv - 1)
  out_bhgd = jnp.zeros((B, Hkv, G, D), q_bhd.dtype).at[jnp.arange(B)[:, None], group_idx_bk].set(o_bkgd)
  return out_bhgd.reshape(B, Hq, D)
