"""Selective decode attention as Pallas kernels on the Triton backend.

Two kernels share one streaming loop (`_stream`):
- split-K (`decode_attention_triton`): one program per (row b, selected group j, split s), writing float32
  partials (o, m, l) of the selected groups only; the splits are merged in XLA and the decode step
  places the normalised groups at their heads. Used where B x K alone would leave SMs idle.
- direct (`decode_attention_triton_direct`): one program per (row b, group g) over *every* group, no split. A
  program whose group row b did not select writes zeros and streams nothing; a selected one streams its
  group and writes the normalised output in q's dtype straight into `[B, Hq, D]`. So the decode step needs no
  merge, no normalise and no scatter into zeros after the kernel (four small XLA kernels per layer fewer).
Unsplit shapes run the persistent kernel (`decode_attention_persistent`) instead of the direct one by default
(`AttentionHeuristics.persistent`).
Each program reads its group id inside the kernel (from `group_idx`, no gathered copy) and streams that
group's K/V blocks straight from the full head-major cache, computing all query heads of the group at once
(rows padded to >= 16 for the tensor-core dot; padded rows duplicate the last real row and are never stored
apart from it). Full key blocks use contiguous unmasked loads (the masked integer-index path capped the
kernel at ~0.75 of copy bandwidth on H100); only the row's last partial block is masked.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _platform
from pallas_kernels import decode_attention_persistent as _persistent
from pallas_kernels._online_softmax import online_softmax_step
from pallas_kernels.decode_attention_xla import M_EMPTY


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """What the Pallas attention kernels run with (static: a different config compiles a different program)."""
  block_k: int  # keys per loop iteration (power of two >= 16)
  num_splits: int  # split-K programs per (row, group); 1: an unsplit kernel (direct or persistent), no merge
  num_warps: int
  num_stages: int
  persistent: bool = False  # unsplit: the persistent kernel (`decode_attention_persistent`) instead of the direct
  programs_per_sm: int = 2  # persistent kernel: programs per SM


@dataclasses.dataclass(frozen=True)
class AttentionHeuristics:
  """How `choose_config` picks an `AttentionConfig` from the static shapes. The defaults are the measured winners
  on one H100 (`kernels.py`, records in benchmarks/results/kernels.jsonl); other values exist for A/B runs, e.g.
  `AttentionHeuristics(persistent=False)` for the direct kernel. Pass one as `selective_decode_attention`'s
  `config` to choose with other rules.

  Attributes:
    direct_programs_per_sm: selected (row, group) programs per SM from which keys are not split. Direct vs split-K
      + merge/scatter (all kernels of the op): B32 K16 S2048 0.190 vs 0.189 ms, B16 K16 0.099 vs 0.100, dense B32
      0.354 vs 0.361, GQA B32 K5 S4096 (160 programs) 0.116 vs 0.125.
    split_target_programs_per_sm: below that, keys are split into about this many programs per SM in all (capped
      so that every split keeps >= 4 key blocks): at 128 selected programs 3 splits 54.6-55.0 us vs 58.3-58.4 with
      the 8 of a target of 8 per SM; at 64, 4-6 splits 32.1-32.8 vs 35.3-35.8 (`kernels.py --only probe`, family
      "splits", MHA D128 S2048).
    deep_pipeline_programs_per_sm: from this many programs per SM the direct kernel pipelines 4 key blocks instead
      of 3 (one program per SM): B32 K16 S2048 0.179 vs 0.183 ms; at 160 programs (GQA B32 K5) 4 stages were
      slower (0.125 vs 0.112 ms: one program per SM leaves a tail wave).
    deep_pipeline_last_wave: below that, 4 stages still where the last wave of one program per SM is at least this
      full: LLaMA-2-7B B16 density 0.5 (256 programs on 132 SMs, last wave 124/132) 1885.5 tok/s with 4 stages vs
      1864.5 with 3; Llama-3.1-8B B64 density 0.625 (320 programs, last wave 56/132) 5951.8 with 4 vs 6130.1 with 3.
    persistent: unsplit shapes run the persistent kernel (`persistent_programs_per_sm` x SMs programs, each
      looping over a run of (row, group) items) where its shape limits allow, instead of one direct program per
      (row, group): 1-6% faster at every MHA shape probed (B16-B64, S1024-4096, K 12-32), GQA B32 K5 S4096 within
      1% (`kernels.py --only probe --families persistent`).
    persistent_stages: the persistent kernel's pipeline depth (3: two programs share an SM).
    persistent_programs_per_sm: the persistent kernel's programs per SM.
  """
  direct_programs_per_sm: int = 1
  split_target_programs_per_sm: int = 2
  deep_pipeline_programs_per_sm: int = 3
  deep_pipeline_last_wave: float = 0.9
  persistent: bool = True
  persistent_stages: int = 3
  persistent_programs_per_sm: int = 2


def choose_config(batch: int, num_selected: int, seq_len: int, head_dim: int, itemsize: int,
                  num_sms: int | None = None, heuristics: AttentionHeuristics = AttentionHeuristics()
                  ) -> AttentionConfig:
  """Block/split/warp choice from the static shapes, by `heuristics`' rules.

  The split count is sized from the selected work (B * K programs), so that small batches or low densities still
  put several programs on every SM, while keeping at least `min_blocks_per_split` key blocks in every split. With
  at least `heuristics.direct_programs_per_sm` selected (row, group) programs per SM, no split (1 split: the
  direct or the persistent kernel in `selective_decode_attention`). Tuned on one H100 (bf16, D=128): block_k
  32/64/128 and 2/4 warps were within 3% of each other at B64 S4096; 8 warps and (block_k 128, 4 warps, masked
  loads) were slower. Unsplit shapes take the persistent kernel where `heuristics.persistent` and its shape
  limits allow.
  """
  h = heuristics
  num_sms = num_sms or _platform.num_sms()
  block_d = max(16, _platform.next_pow2(head_dim))
  tile_bytes = block_d * itemsize
  block_k = 64 if tile_bytes <= 256 else 32
  block_k = max(16, min(block_k, _platform.next_pow2(seq_len)))
  work = batch * num_selected
  n_blocks = _platform.cdiv(seq_len, block_k)
  min_blocks_per_split = 4
  splits = _platform.cdiv(h.split_target_programs_per_sm * num_sms, work)
  splits = max(1, min(splits, n_blocks // min_blocks_per_split))
  if work >= h.direct_programs_per_sm * num_sms:
    splits = 1   # enough (row, group) programs without splitting keys: no merge after the kernel
  # A 4-deep pipeline (128 KB of shared memory: one program per SM) where the direct kernel has >= 3 waves of
  # programs anyway, or fewer whole waves whose last one is >= 90% full; 3 stages (two programs per SM) elsewhere,
  # where a second program per SM fills the tail.
  last_wave = (work % num_sms or num_sms) / num_sms
  deep = splits == 1 and (work >= h.deep_pipeline_programs_per_sm * num_sms
                          or last_wave >= h.deep_pipeline_last_wave)
  persistent = h.persistent and splits == 1 and _persistent.supports(seq_len, head_dim, block_k)
  stages = h.persistent_stages if persistent else 4 if deep else 3
  return AttentionConfig(block_k=block_k, num_splits=splits, num_warps=4, num_stages=stages, persistent=persistent,
                         programs_per_sm=h.persistent_programs_per_sm)


def _stream(q_ref, k_ref, v_ref, group, length, start, *, selected, scale: float, group_size: int,
            head_dim: int, block_g: int, block_d: int, block_k: int, split, num_splits: int, scale_refs=None):
  """Online-softmax pass of one group's query heads over its keys [start, length) of one row.

  Streams this split's share of the key blocks (nothing when `selected` is False). `scale_refs`: (k_scale,
  v_scale) refs `[Hkv, S]` of an 8-bit cache (dequantised in registers), or None. Returns
  (o_gd unnormalised float32, m_g, l_g, rows_g, cols_d): `rows_g`/`cols_d` are the clamped row/column
  indices of the padded tile, for the stores.
  """
  num_kv_heads, seq_len, _ = k_ref.shape
  # Padded query rows / head_dim columns index a clamped copy of the last real
  # row / column, so they compute duplicates of real values; the unmasked stores
  # then write identical values to the same address (benign on GPU and in
  # interpret mode, where a masked store would be a racy read-modify-write).
  rows_g = jnp.minimum(jnp.arange(block_g, dtype=jnp.int32), group_size - 1)
  cols_d = jnp.arange(block_d, dtype=jnp.int32)
  col_ok_d = cols_d < head_dim  # reduction mask for q.k
  cols_d = jnp.minimum(cols_d, head_dim - 1)
  pad_d = block_d != head_dim

  q_index = ((group * group_size + rows_g)[:, None], cols_d[None, :])
  if pad_d:
    q_gd = plgpu.load(q_ref.at[q_index],
                      mask=jnp.broadcast_to(col_ok_d[None, :], (block_g, block_d)),
                      other=0)
  else:
    q_gd = q_ref[q_index]

  n_keys = length - start
  n_blocks = jnp.where(selected, (n_keys + block_k - 1) // block_k, 0)
  per_split = (n_blocks + num_splits - 1) // num_splits
  lo = split * per_split
  hi = jnp.minimum(lo + per_split, n_blocks)
  # Full blocks take contiguous unmasked loads; only the row's last, partial
  # block (at most one per split) takes the masked gather path.
  full_hi = jnp.minimum(hi, n_keys // block_k)

  def update(carry, k_kd, v_kd, key_ok_k, scales=(None, None)):
    return online_softmax_step(carry, q_gd, k_kd, v_kd, key_ok_k, scale, *scales)

  def full_body(i, carry):
    keys = pl.ds(start + i * block_k, block_k)
    scales = (None, None) if scale_refs is None else tuple(r[group, keys] for r in scale_refs)
    return update(carry, k_ref[group, keys, :], v_ref[group, keys, :], None, scales)

  def masked_body(i, carry):
    pos_k = start + i * block_k + jnp.arange(block_k, dtype=jnp.int32)
    key_ok_k = pos_k < length  # reduction mask (unclamped positions)
    kv_index = (group, jnp.minimum(pos_k, seq_len - 1)[:, None], cols_d[None, :])
    kv_mask = jnp.broadcast_to(key_ok_k[:, None], (block_k, block_d))
    k_kd = plgpu.load(k_ref.at[kv_index], mask=kv_mask, other=0.0)
    v_kd = plgpu.load(v_ref.at[kv_index], mask=kv_mask, other=0.0)
    scales = (None, None)
    if scale_refs is not None:   # masked keys' scales load as 0 (finite)
      scale_index = (group, jnp.minimum(pos_k, seq_len - 1))
      scales = tuple(plgpu.load(r.at[scale_index], mask=key_ok_k, other=0) for r in scale_refs)
    return update(carry, k_kd, v_kd, key_ok_k, scales)

  init = (jnp.zeros((block_g, block_d), jnp.float32),
          jnp.full((block_g,), M_EMPTY, jnp.float32),
          jnp.zeros((block_g,), jnp.float32))
  if pad_d or block_k > seq_len:  # masked columns / no full block possible
    o_gd, m_g, l_g = lax.fori_loop(lo, hi, masked_body, init)
  else:
    carry = lax.fori_loop(lo, full_hi, full_body, init)
    o_gd, m_g, l_g = lax.fori_loop(jnp.maximum(full_hi, lo), hi, masked_body,
                                   carry)
  return o_gd, m_g, l_g, rows_g, cols_d


def _store(ref, value, rows_g, cols_d, whole: bool):
  """Stores a padded [block_g(, block_d)] tile into its [G(, D)] block."""
  if whole:
    ref[...] = value
  elif value.ndim == 2:
    ref[rows_g[:, None], cols_d[None, :]] = value
  else:
    ref[rows_g] = value


def _row_bounds(len_ref, start_ref, b, seq_len):
  length = jnp.clip(len_ref[b], 0, seq_len)
  return length, jnp.clip(start_ref[b], 0, length)


def _attention_kernel(*refs, counted: bool = False, quantised: bool = False, **kw):
  """Split-K program (b, j, split): refs = ([count_ref,] gidx_ref, len_ref, start_ref, q_ref [Hq, D], k_ref/v_ref
  [Hkv, S, D] of row b, [ks_ref/vs_ref [Hkv, S] (`quantised`: an 8-bit cache's scales),] o_ref [G, D], m/l [G]).
  `counted`: slot j >= count_ref[b] streams nothing (o = 0, l = 0)."""
  count_ref = None
  if counted:
    count_ref, *refs = refs
  *refs, o_ref, m_ref, l_ref = refs
  refs, kw["scale_refs"] = _split_scales(refs, quantised)
  gidx_ref, len_ref, start_ref, q_ref, k_ref, v_ref = refs
  b, j, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  num_kv_heads, seq_len, _ = k_ref.shape
  group = jnp.clip(gidx_ref[b, j], 0, num_kv_heads - 1)
  length, start = _row_bounds(len_ref, start_ref, b, seq_len)
  selected = True if count_ref is None else j < count_ref[b]
  o_gd, m_g, l_g, rows_g, cols_d = _stream(q_ref, k_ref, v_ref, group, length, start, selected=selected,
                                           split=split, **kw)
  whole = _unpadded(kw)
  _store(o_ref, o_gd, rows_g, cols_d, whole)
  _store(m_ref, m_g, rows_g, cols_d, whole)
  _store(l_ref, l_g, rows_g, cols_d, whole)


def _direct_kernel(*refs, num_selected: int | None, counted: bool = False, quantised: bool = False, **kw):
  """Direct program (b, g): refs = ([count_ref,] [gidx_ref,] len_ref, start_ref, q_ref, k_ref, v_ref, [ks_ref,
  vs_ref,] o_ref), o_ref [G, D] of group g of row b. num_selected None: every group (dense); else group g is computed
  when one of row b's `num_selected` (clamped) entries of gidx names it (`counted`: one of its first count_ref[b]),
  and written as zeros otherwise (streaming nothing). `quantised`: an 8-bit cache with its scales' refs."""
  *refs, o_ref = refs
  count_ref = None
  if counted:
    count_ref, *refs = refs
  refs, kw["scale_refs"] = _split_scales(refs, quantised)
  if num_selected is None:
    gidx_ref, (len_ref, start_ref, q_ref, k_ref, v_ref) = None, refs
  else:
    gidx_ref, len_ref, start_ref, q_ref, k_ref, v_ref = refs
  b, group = pl.program_id(0), pl.program_id(1)
  num_kv_heads, seq_len, _ = k_ref.shape
  length, start = _row_bounds(len_ref, start_ref, b, seq_len)
  selected = True
  if num_selected is not None:
    selected = False
    for j in range(num_selected):   # K scalar reads; K <= Hkv is small
      named = jnp.clip(gidx_ref[b, j], 0, num_kv_heads - 1) == group
      if count_ref is not None:
        named = named & (j < count_ref[b])
      selected = selected | named
  o_gd, _, l_g, rows_g, cols_d = _stream(q_ref, k_ref, v_ref, group, length, start, selected=selected,
                                         split=0, num_splits=1, **kw)
  # o / l, and 0 where nothing was attended (l == 0: unselected group or empty key range; o is 0 there too).
  out_gd = o_gd / jnp.where(l_g > 0, l_g, 1.0)[:, None]
  _store(o_ref, out_gd.astype(o_ref.dtype), rows_g, cols_d, _unpadded(kw))


def _split_scales(refs, quantised: bool):
  """(refs without the trailing scale refs, (ks_ref, vs_ref) or None)."""
  return (refs[:-2], tuple(refs[-2:])) if quantised else (refs, None)


def scale_specs(k_scale_BHS, v_scale_BHS, spec):
  """(in_specs, args) to append for an 8-bit cache's scales (`spec` the BlockSpec of one), or empty lists."""
  if k_scale_BHS is None:
    return [], []
  return [spec, spec], [k_scale_BHS, v_scale_BHS]


def _unpadded(kw) -> bool:
  """True when the tile is exactly [G, D] (no padded rows or columns): whole-block stores."""
  return kw["block_g"] == kw["group_size"] and kw["block_d"] == kw["head_dim"]


def _kernel_kw(scale, G, D, config):
  return dict(scale=scale, group_size=G, head_dim=D, block_g=max(16, _platform.next_pow2(G)),
              block_d=max(16, _platform.next_pow2(D)), block_k=config.block_k)


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def decode_attention_triton(q_BHD, k_BHSD, v_BHSD, lengths_B, group_idx_BK,
                            kv_start_B, *, scale: float, config: AttentionConfig,
                            interpret: bool, group_count_B=None, k_scale_BHS=None, v_scale_BHS=None):
  """Returns split-merged partials for the selected groups only.

  `k_scale_BHS`, `v_scale_BHS`: float32 `[B, Hkv, S]` scales of an 8-bit cache (`pallas_kernels.kv_quant`), or None.

  `group_count_B`: optional [B] int; slot j of row b with j >= group_count_B[b] streams nothing (o = 0, l = 0,
  m = M_EMPTY).

  Returns:
    (o_BKGD unnormalised float32, m_BKG, l_BKG), group j of row b at [b, j].
  """
  B, Hq, D = q_BHD.shape
  _, Hkv, S, _ = k_BHSD.shape
  K = group_idx_BK.shape[1]
  G = Hq // Hkv
  NS = config.num_splits
  counted = group_count_B is not None
  quantised = k_scale_BHS is not None
  kernel = functools.partial(_attention_kernel, num_splits=NS, counted=counted, quantised=quantised,
                             **_kernel_kw(scale, G, D, config))
  whole2 = lambda b, j, s: (0, 0)
  whole1 = lambda b, j, s: (0,)
  in_specs = [
      pl.BlockSpec((B, K), whole2),
      pl.BlockSpec((B,), whole1),
      pl.BlockSpec((B,), whole1),
      pl.BlockSpec((None, Hq, D), lambda b, j, s: (b, 0, 0)),
      pl.BlockSpec((None, Hkv, S, D), lambda b, j, s: (b, 0, 0, 0)),
      pl.BlockSpec((None, Hkv, S, D), lambda b, j, s: (b, 0, 0, 0)),
  ]
  args = [group_idx_BK.astype(jnp.int32), lengths_B.astype(jnp.int32), kv_start_B.astype(jnp.int32), q_BHD,
          k_BHSD, v_BHSD]
  specs, scales = scale_specs(k_scale_BHS, v_scale_BHS, pl.BlockSpec((None, Hkv, S), lambda b, j, s: (b, 0, 0)))
  in_specs, args = in_specs + specs, args + scales
  if counted:
    in_specs.insert(0, pl.BlockSpec((B,), whole1))
    args.insert(0, group_count_B.astype(jnp.int32))
  o_p, m_p, l_p = pl.pallas_call(
      kernel,
      grid=(B, K, NS),
      in_specs=in_specs,
      out_specs=[
          pl.BlockSpec((None, None, None, G, D), lambda b, j, s: (b, j, s, 0, 0)),
          pl.BlockSpec((None, None, None, G), lambda b, j, s: (b, j, s, 0)),
          pl.BlockSpec((None, None, None, G), lambda b, j, s: (b, j, s, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((B, K, NS, G, D), jnp.float32),
          jax.ShapeDtypeStruct((B, K, NS, G), jnp.float32),
          jax.ShapeDtypeStruct((B, K, NS, G), jnp.float32),
      ],
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name="selective_decode_attention",
  )(*args)
  if NS == 1:
    return o_p[:, :, 0], m_p[:, :, 0], l_p[:, :, 0]
  m_BKG = jnp.max(m_p, axis=2)
  w_BKNG = jnp.exp(m_p - m_BKG[:, :, None])
  l_BKG = jnp.sum(l_p * w_BKNG, axis=2)
  o_BKGD = jnp.sum(o_p * w_BKNG[..., None], axis=2)
  return o_BKGD, m_BKG, l_BKG


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def decode_attention_triton_direct(q_BHD, k_BHSD, v_BHSD, lengths_B, group_idx_BK, kv_start_B, *, scale: float,
                                   config: AttentionConfig, interpret: bool, group_count_B=None, k_scale_BHS=None,
                                   v_scale_BHS=None):
  """Normalised output `[B, Hq, D]` in q's dtype, query heads of unselected groups exactly 0.

  `k_scale_BHS`, `v_scale_BHS`: float32 `[B, Hkv, S]` scales of an 8-bit cache (`pallas_kernels.kv_quant`), or None.

  One program per (row, group) over all Hkv groups, no key split (`config.num_splits` is ignored);
  `group_idx_BK` None computes every group; `group_count_B` (with `group_idx_BK`): row b selects only the groups
  of its first `group_count_B[b]` slots, the other programs stream nothing.
  """
  B, Hq, D = q_BHD.shape
  _, Hkv, S, _ = k_BHSD.shape
  G = Hq // Hkv
  K = None if group_idx_BK is None else group_idx_BK.shape[1]
  counted = group_count_B is not None
  if counted and K is None:
    raise ValueError("group_count_B needs group_idx_BK")
  kernel = functools.partial(_direct_kernel, num_selected=K, counted=counted, quantised=k_scale_BHS is not None,
                             **_kernel_kw(scale, G, D, config))
  row = lambda b, g: (0,)  # noqa: E731
  cache_spec = pl.BlockSpec((None, Hkv, S, D), lambda b, g: (b, 0, 0, 0))
  in_specs = [
      pl.BlockSpec((B,), row),
      pl.BlockSpec((B,), row),
      pl.BlockSpec((None, Hq, D), lambda b, g: (b, 0, 0)),
      cache_spec,
      cache_spec,
  ]
  args = [lengths_B.astype(jnp.int32), kv_start_B.astype(jnp.int32), q_BHD, k_BHSD, v_BHSD]
  if K is not None:
    in_specs.insert(0, pl.BlockSpec((B, K), lambda b, g: (0, 0)))
    args.insert(0, group_idx_BK.astype(jnp.int32))
  if counted:
    in_specs.insert(0, pl.BlockSpec((B,), row))
    args.insert(0, group_count_B.astype(jnp.int32))
  specs, scales = scale_specs(k_scale_BHS, v_scale_BHS, pl.BlockSpec((None, Hkv, S), lambda b, g: (b, 0, 0)))
  in_specs, args = in_specs + specs, args + scales
  out = pl.pallas_call(
      kernel,
      grid=(B, Hkv),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, G, D), lambda b, g: (b, g, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((B, Hkv, G, D), q_BHD.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name="selective_decode_attention_direct",
  )(*args)
  return out.reshape(B, Hq, D)
