"""Selective decode attention as persistent Pallas (Triton) programs, a few per SM.

The direct kernel (`decode_attention_triton_direct`) launches one program per (row, group): at B32 x 16 selected
groups that is ~4 waves of one 4-stage program per SM, and every program pays a pipeline fill (its first key
blocks' latency), a drain and a relaunch with nothing else streaming on its SM. Measured on one H100
(`kernels.py --only probe`, family "length"): ~11.5 us of fixed cost per call at 512 programs.

Here `programs_per_sm` x SMs programs (2 x 132 on an H100) each own a contiguous run of the selected (row, group)
items and loop over them: per item, its whole key blocks as contiguous unmasked loads (software-pipelined), then the
row's partial block masked, then the normalised output stored. Two 3-stage programs share an SM, so one streams
while the other refills its pipeline between items; items never wait for a new wave. Query heads of unselected
groups are written as zeros by the program that owns the row (`b % programs`), after its items.

Adaptive budgets (`group_count_B`: row b uses only its first `group_count_B[b]` selected slots): XLA compacts the
(row, slot) list to the counted items before the kernel (`compact_items`: a cumsum and a scatter over B x K
int32s) and hands the kernel that list and its dynamic total; each program takes a balanced share
`ceil(total / programs)` of it, so the bytes read and the work per program follow the realised density while the
grid stays static (B x K bounds the program count).

Measured on one H100 (`kernels.py --only probe --families persistent`, results/kernels.jsonl, MHA D128
unless noted, direct kernel vs this one): B32 K16 S2048 186.3 vs 181.0 us, S1024 98.6 vs 93.8, S4096 360.2 vs
353.8, dense B32 356.3 vs 352.0, B16 K16 98.6 vs 93.0, B64 K16 359.6 vs 354.0, GQA (Hkv 8) B32 K5 S4096 118.0 vs
118.8, dense 181.7 vs 179.4. A flat variant (one loop over (item, key block), prefetching across items) was slower:
the per-block item arithmetic and masked loads cost more than the refills it hid (225.8 us at B32 K16, 4 stages).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _platform
from pallas_kernels._online_softmax import online_softmax_step
from pallas_kernels.decode_attention_xla import M_EMPTY


def supports(seq_len: int, head_dim: int, block_k: int, cache_size: int = 0) -> bool:
  """Shapes the persistent kernel takes: a power-of-two head_dim, at least one whole key block, and caches of
  < 2**31 elements (`cache_size`; it indexes the whole cache with 32-bit offsets)."""
  return (head_dim >= 16 and head_dim == _platform.next_pow2(head_dim) and seq_len >= block_k
          and cache_size < 2**31)


def num_programs(num_items: int, programs_per_sm: int, num_sms: int | None = None) -> tuple[int, int]:
  """(programs, items per program): contiguous runs of equal size, no program without work."""
  num_sms = num_sms or _platform.num_sms()
  per_program = _platform.cdiv(num_items, max(1, min(num_items, programs_per_sm * num_sms)))
  return _platform.cdiv(num_items, per_program), per_program


def _kernel(*refs, num_selected: int | None, num_items: int, items_per_program: int, num_programs: int,
            scale: float, group_size: int, block_g: int, block_k: int, counted: bool = False,
            quantised: bool = False):
  """Program p: items [p * items_per_program, ...) of the row-major (row b, selected slot j) list.

  refs = ([items_ref, total_ref, count_ref,] [gidx_ref,] len_ref, start_ref, q_ref [B, Hq, D], k_ref/v_ref
  [B, Hkv, S, D], [ks_ref/vs_ref [B, Hkv, S] (`quantised`: an 8-bit cache's scales),] o_ref [B, Hkv, G, D]).
  `counted`: the items are `items_ref[:total_ref[0]]` (flat b * K + j of
  the counted slots, `compact_items`), each program a share of ceil(total / num_programs) of them; slots
  j >= count_ref[b] are unselected. A loop over the items around each item's key blocks: whole blocks as
  contiguous unmasked loads, then the row's partial block (at most one) masked."""
  items_ref = total_ref = count_ref = None
  if counted:
    items_ref, total_ref, count_ref, *refs = refs
  scale_refs = None
  if quantised:
    *refs, ks_ref, vs_ref, o_ref = refs
    scale_refs = (ks_ref, vs_ref)
    refs = refs + [o_ref]
  if num_selected is None:
    gidx_ref, (len_ref, start_ref, q_ref, k_ref, v_ref, o_ref) = None, refs
  else:
    gidx_ref, len_ref, start_ref, q_ref, k_ref, v_ref, o_ref = refs
  batch, num_kv_heads, seq_len, head_dim = k_ref.shape
  slots = num_kv_heads if num_selected is None else num_selected
  p = pl.program_id(0)
  if counted:
    total = jnp.clip(total_ref[0], 0, num_items)
    share = (total + num_programs - 1) // num_programs
    first = p * share
    mine = jnp.clip(total - first, 0, share)
  else:
    first = p * items_per_program
    mine = jnp.clip(num_items - first, 0, items_per_program)
  rows_g = jnp.minimum(jnp.arange(block_g, dtype=jnp.int32), group_size - 1)  # padded rows repeat the last
  cols_d = jnp.arange(head_dim, dtype=jnp.int32)
  arange_k = jnp.arange(block_k, dtype=jnp.int32)

  def item_at(it):
    item = first + it
    if counted:
      item = jnp.clip(items_ref[item], 0, num_items - 1)
    b = item // slots
    j = item - b * slots
    group = j if gidx_ref is None else jnp.clip(gidx_ref[b, j], 0, num_kv_heads - 1)
    length = jnp.clip(len_ref[b], 0, seq_len)
    return b, group, length, jnp.clip(start_ref[b], 0, length)

  def masked_block(b, group, length, nominal):
    """The key block starting at `nominal`, as a whole block inside the cache (its start clamped to S - block_k;
    keys before `nominal` belong to the previous block) with the keys outside [nominal, length) masked."""
    s0 = jnp.minimum(nominal, seq_len - block_k)
    pos_k = s0 + arange_k
    ok_k = (pos_k >= nominal) & (pos_k < length)
    mask = jnp.broadcast_to(ok_k[:, None], (block_k, head_dim))
    keys = pl.ds(s0, block_k)
    scales = (None, None)
    if scale_refs is not None:   # masked keys' scales load as 0 (finite)
      scales = tuple(plgpu.load(r.at[b, group, keys], mask=ok_k, other=0) for r in scale_refs)
    return (plgpu.load(k_ref.at[b, group, keys, :], mask=mask, other=0.0),
            plgpu.load(v_ref.at[b, group, keys, :], mask=mask, other=0.0), ok_k, *scales)

  init = (jnp.zeros((block_g, head_dim), jnp.float32), jnp.full((block_g,), M_EMPTY, jnp.float32),
          jnp.zeros((block_g,), jnp.float32))

  def item_body(it, done):
    b, group, length, start = item_at(it)
    q_gd = q_ref[b, (group * group_size + rows_g)[:, None], cols_d[None, :]]
    n_keys = length - start
    whole_blocks = n_keys // block_k

    def whole_body(i, carry):
      keys = pl.ds(start + i * block_k, block_k)
      scales = (None, None) if scale_refs is None else tuple(r[b, group, keys] for r in scale_refs)
      return online_softmax_step(carry, q_gd, k_ref[b, group, keys, :], v_ref[b, group, keys, :], None, scale,
                                 *scales)

    def tail_body(i, carry):
      k_kd, v_kd, ok_k, *scales = masked_block(b, group, length, start + i * block_k)
      return online_softmax_step(carry, q_gd, k_kd, v_kd, ok_k, scale, *scales)

    carry = lax.fori_loop(0, whole_blocks, whole_body, init)
    o_gd, _, l_g = lax.fori_loop(whole_blocks, (n_keys + block_k - 1) // block_k, tail_body, carry)
    out_gd = (o_gd / jnp.where(l_g > 0, l_g, 1.0)[:, None]).astype(o_ref.dtype)
    if block_g == group_size:
      o_ref[b, group, :, :] = out_gd
    else:   # duplicated padded rows store the same values at the same addresses
      o_ref[b, group, rows_g[:, None], cols_d[None, :]] = out_gd
    return done + 1      # a loop-carried value (Triton's scf.for needs one)

  lax.fori_loop(0, mine, item_body, jnp.int32(0))

  if num_selected is not None:
    # Zeros for the query heads of row b's unselected groups, by program b % num_programs (disjoint from the
    # selected groups' slots that the items write, so no ordering between programs is needed).
    block_h = _platform.next_pow2(num_kv_heads)
    groups_h = jnp.arange(block_h, dtype=jnp.int32)
    index = (jnp.minimum(groups_h, num_kv_heads - 1)[:, None, None], rows_g[None, :, None],
             cols_d[None, None, :])
    zeros = jnp.zeros((block_h, block_g, head_dim), o_ref.dtype)
    for r in range(_platform.cdiv(batch, num_programs)):
      b = p + r * num_programs

      @pl.when(b < batch)
      def _():
        b_c = jnp.minimum(b, batch - 1)
        chosen_h = groups_h >= num_kv_heads
        for j in range(num_selected):
          named_h = groups_h == jnp.clip(gidx_ref[b_c, j], 0, num_kv_heads - 1)
          if counted:
            named_h = named_h & (j < count_ref[b_c])
          chosen_h = chosen_h | named_h
        mask = jnp.broadcast_to((~chosen_h)[:, None, None], zeros.shape)
        plgpu.store(o_ref.at[(b_c,) + index], zeros, mask=mask)


def compact_items(group_count_B: jax.Array, num_selected: int) -> tuple[jax.Array, jax.Array]:
  """The counted (row, slot) items, front-packed: (int32 `[B * K]` whose first `total` entries are b * K + j for
  the slots j < group_count_B[b] in row-major order (the rest 0, never read), int32 `[1]` total)."""
  B = group_count_B.shape[0]
  counted_N = (jnp.arange(num_selected, dtype=jnp.int32)[None, :]
               < jnp.clip(group_count_B.astype(jnp.int32), 0, num_selected)[:, None]).reshape(-1)
  n = B * num_selected
  slot_N = jnp.cumsum(counted_N.astype(jnp.int32)) - 1
  items_N = jnp.zeros((n,), jnp.int32).at[jnp.where(counted_N, slot_N, n)].set(
      jnp.arange(n, dtype=jnp.int32), mode="drop")
  return items_N, jnp.sum(counted_N.astype(jnp.int32)).reshape(1)


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret", "num_sms"))
def decode_attention_persistent(q_BHD, k_BHSD, v_BHSD, lengths_B, group_idx_BK, kv_start_B, *, scale: float,
                                config, interpret: bool, num_sms: int | None = None, group_count_B=None,
                                k_scale_BHS=None, v_scale_BHS=None):
  """Normalised output `[B, Hq, D]` in q's dtype, query heads of unselected groups exactly 0 (as the direct
  kernel). `group_idx_BK` None computes every group; `group_count_B` (with `group_idx_BK`): row b uses only its
  first `group_count_B[b]` slots (clamped to [0, K]), the counted items compacted before the kernel. Needs
  `supports(S, D, config.block_k, k_BHSD.size)`; uses `config.block_k`, `num_warps`, `num_stages` and
  `programs_per_sm`. `k_scale_BHS`, `v_scale_BHS`: float32 `[B, Hkv, S]` scales of an 8-bit cache
  (`pallas_kernels.kv_quant`), or None."""
  B, Hq, D = q_BHD.shape
  _, Hkv, S, _ = k_BHSD.shape
  if not supports(S, D, config.block_k, k_BHSD.size):
    raise ValueError(f"the persistent attention kernel needs a power-of-two head_dim >= 16, S >= block_k and "
                     f"< 2**31 cache elements; got D={D}, S={S}, block_k={config.block_k}, {k_BHSD.size} elements")
  G = Hq // Hkv
  K = None if group_idx_BK is None else group_idx_BK.shape[1]
  num_items = B * (Hkv if K is None else K)
  programs, per_program = num_programs(num_items, config.programs_per_sm, num_sms)
  counted = group_count_B is not None
  if counted and K is None:
    raise ValueError("group_count_B needs group_idx_BK")
  kernel = functools.partial(_kernel, num_selected=K, num_items=num_items, items_per_program=per_program,
                             num_programs=programs, scale=scale, group_size=G,
                             block_g=max(16, _platform.next_pow2(G)), block_k=config.block_k, counted=counted,
                             quantised=k_scale_BHS is not None)
  whole = lambda shape: pl.BlockSpec(shape, lambda p: (0,) * len(shape))  # noqa: E731
  in_specs = [whole((B,)), whole((B,)), whole((B, Hq, D)), whole((B, Hkv, S, D)), whole((B, Hkv, S, D))]
  args = [lengths_B.astype(jnp.int32), kv_start_B.astype(jnp.int32), q_BHD, k_BHSD, v_BHSD]
  if K is not None:
    in_specs.insert(0, whole((B, K)))
    args.insert(0, group_idx_BK.astype(jnp.int32))
  if counted:
    items_N, total_1 = compact_items(group_count_B, K)
    in_specs[:0] = [whole((num_items,)), whole((1,)), whole((B,))]
    args[:0] = [items_N, total_1, group_count_B.astype(jnp.int32)]
  if k_scale_BHS is not None:
    in_specs += [whole((B, Hkv, S)), whole((B, Hkv, S))]
    args += [k_scale_BHS, v_scale_BHS]
  out = pl.pallas_call(
      kernel,
      grid=(programs,),
      in_specs=in_specs,
      out_specs=whole((B, Hkv, G, D)),
      out_shape=jax.ShapeDtypeStruct((B, Hkv, G, D), q_BHD.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
      interpret=interpret,
      name="selective_decode_attention_persistent",
  )(*args)
  return out.reshape(B, Hq, D)
