"""Multi-head / grouped-query self-attention with a head-major KV cache.

Prefill runs dense causal attention over a compacted (right-padded) prompt and writes K/V of every head to the
cache. Decode writes the new token's K/V to every head's slot (`pallas_kernels.rope_append` after a fused q|k|v
projection, else an XLA scatter), then attends over the selected KV groups (all for `DenseHeads`) with
`pallas_kernels.selective_decode_attention`. Under tensor parallelism (a `mesh`) the kernel runs inside
`jax.shard_map` on each shard's heads (`polar_jax.sharding`). An 8-bit cache (`polar_jax.kv_cache.QuantizedKV`) is
written quantised and read by the kernels with its scales (one device; contiguous or paged).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from pallas_kernels.decode_attention_xla import append_kv_xla
from polar_jax import kv_cache, paged_kv_cache, rope, sharding
from polar_jax.config import ModelConfig
from polar_jax.fusion import split_qkv
from polar_jax.layers import Linear
from polar_jax.options import DecodeOptions
from polar_jax.selection import (DENSE_HEADS, GroupIndices, HeadSelection, LinearRouter, OracleHeads,
                                 group_norms, keep_top_groups)

__all__ = ["Attention", "AttnOut", "Normed", "group_norms", "keep_top_groups", "prefill_attention"]

# Query rows processed at once by the XLA prefill attention, bounding its score buffer.
_SCORE_BUDGET = 1 << 28  # float32 elements
_MASKED = -1e30


def prefill_attention(q_bthd, k_bshd, v_bshd, lengths_b, *, scale: float, window: int | None = None):
  """Causal attention of a compacted prompt: query t sees keys s <= t with s < lengths_b[b].

  Args:
    q_bthd: `[B, T, Hq, D]` queries.
    k_bshd, v_bshd: `[B, S, Hkv, D]` keys and values (S == T for prefill).
    lengths_b: int32 `[B]` valid tokens per row.
    scale: softmax scale.
    window: sliding window (keys with s > t - window), or None.

  Returns:
    `[B, T, Hq, D]` in q's dtype; rows t >= lengths_b[b] hold finite garbage.
  """
  b, t, hq, d = q_bthd.shape
  s, hkv = k_bshd.shape[1], k_bshd.shape[2]
  r = hq // hkv
  q = q_bthd.reshape(b, t, hkv, r, d)
  chunk = max(1, min(t, _SCORE_BUDGET // max(1, b * hq * s)))
  key_pos = jnp.arange(s)
  outs = []
  for start in range(0, t, chunk):
    qc = q[:, start:start + chunk]
    tc = qc.shape[1]
    scores = jnp.einsum("btgrd,bsgd->bgrts", qc, k_bshd, preferred_element_type=jnp.float32) * scale
    q_pos = jnp.arange(start, start + tc)
    mask = (key_pos[None, :] <= q_pos[:, None])[None] & (key_pos[None, None, :] < lengths_b[:, None, None])
    if window is not None:
      mask = mask & (key_pos[None, :] > q_pos[:, None] - window)[None]
    scores = jnp.where(mask[:, None, None], scores, _MASKED)  # finite: rows with no key stay NaN-free
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bgrts,bsgd->btgrd", probs.astype(v_bshd.dtype), v_bshd,
                     preferred_element_type=jnp.float32)
    outs.append(out.astype(q_bthd.dtype))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
  return out.reshape(b, t, hq, d)


class Attention(nnx.Module):
  """Self-attention of one layer: q/k/v/o projections (q|k|v one matmul after `polar_jax.fusion`), grouped-query
  heads, RoPE or none (OPT), an optional sliding window.

  Args:
    config: the model's `ModelConfig` (heads, KV groups, head_dim, biases, positions, sliding window).
    dtype: parameter dtype.
    rngs: `nnx.Rngs` for the random initial weights.

  `forward` / `prefill` attend over a compacted batch of prompts (`prefill` also writes the KV cache); `decode`
  attends one new token per row to the cached keys and values, only over the KV groups a `HeadSelection` keeps
  when Polar Sparsity is on.
  """

  def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
    d, hq, hkv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    self.q_proj = Linear(d, hq * hd, bias=config.attn_bias, dtype=dtype, rngs=rngs)
    self.k_proj = Linear(d, hkv * hd, bias=config.attn_bias, dtype=dtype, rngs=rngs)
    self.v_proj = Linear(d, hkv * hd, bias=config.attn_bias, dtype=dtype, rngs=rngs)
    self.o_proj = Linear(hq * hd, d, bias=config.o_bias, dtype=dtype, rngs=rngs)
    self.qkv_proj = nnx.data(None)   # one KV-group-major q|k|v projection after `fusion.fuse_projections`
    self.num_heads, self.num_kv_heads, self.head_dim = hq, hkv, hd
    self.window = config.sliding_window
    self.use_rope = config.positions == "rope"
    self.inv_freq = tuple(rope.inverse_frequencies(config).tolist()) if self.use_rope else None
    self.scale = 1.0 / math.sqrt(hd)

  def _qkv(self, x_btd, positions_bt):
    b, t, _ = x_btd.shape
    if self.qkv_proj is not None:
      q, k, v = split_qkv(self.qkv_proj(x_btd), self.num_heads, self.num_kv_heads, self.head_dim)
    else:
      q, k, v = self.q_proj(x_btd), self.k_proj(x_btd), self.v_proj(x_btd)
    q = q.reshape(b, t, self.num_heads, self.head_dim)
    k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.use_rope:
      cos, sin = rope.rope_cos_sin(positions_bt, np.asarray(self.inv_freq, np.float32))
      q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
    return q, k, v

  def forward(self, x_btd, lengths_b, *, return_context=False):
    """Cache-free attention over a compacted batch (used for full-sequence logits).

    With `return_context`, also returns the context `[B, T, Hq, D]` before o_proj (router data).
    """
    b, t, _ = x_btd.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    q, k, v = self._qkv(x_btd, positions)
    ctx = prefill_attention(q, k, v, lengths_b, scale=self.scale, window=self.window)
    out = self.o_proj(ctx.reshape(b, t, -1))
    if return_context:
      return out, (k, v), ctx
    return out, (k, v)

  def prefill(self, x_btd, lengths_b, k_cache_bhsd, v_cache_bhsd, row0=0, *, mesh=None):
    """Attention over compacted prompts (cache rows [row0, row0 + B)); writes every head's K/V into slots [0, T).
    `mesh`: the tensor-parallel mesh the cache is sharded on (by KV group), or None."""
    _check_kv8_layout(k_cache_bhsd, mesh)
    out, (k, v) = self.forward(x_btd, lengths_b)
    k_cache_bhsd = kv_cache.write_prefill(k_cache_bhsd, k, row0)
    v_cache_bhsd = kv_cache.write_prefill(v_cache_bhsd, v, row0)
    if mesh is not None:
      k_cache_bhsd = sharding.constrain_cache(k_cache_bhsd, mesh)
      v_cache_bhsd = sharding.constrain_cache(v_cache_bhsd, mesh)
    return out, k_cache_bhsd, v_cache_bhsd

  def fuses_qkv(self, mesh=None) -> bool:
    """Whether `decode` projects q|k|v with one fused weight and writes K/V with `rope_append` (one device)."""
    return self.qkv_proj is not None and mesh is None

  def fuses_router(self, heads: HeadSelection, options: DecodeOptions, mesh=None) -> bool:
    """Whether `decode` evaluates a `LinearRouter` itself, as extra programs of the q|k|v kernel."""
    return (isinstance(heads, LinearRouter) and options.router_in_qkv and self.fuses_qkv(mesh)
            and heads.side is not None and heads.side[0].dtype == self.qkv_proj.kernel.dtype)

  def decode(self, x_bd, lengths_b, k_cache_bhsd, v_cache_bhsd, heads: HeadSelection = DENSE_HEADS, *,
             options: DecodeOptions = DecodeOptions(), mesh=None, residual_bd=None,
             rms: pallas_kernels.RmsInput | None = None, norm_scale=None, page_table_bp=None) -> "AttnOut":
    """One decode step: writes K/V of every head at slot lengths_b, attends over the selected groups.

    Args:
      x_bd: `[B, d]` normed hidden state of the new token (`h * g` with `rms`).
      lengths_b: int32 `[B]` tokens already in the cache (= the new token's position).
      k_cache_bhsd, v_cache_bhsd: this layer's caches; with `page_table_bp`, its page pools `[Hkv, P, S, D]`
        (`polar_jax.paged_kv_cache.PagedKVCache`).
      heads: the KV groups to attend to (`polar_jax.selection`). A `LinearRouter` only where `fuses_router`
        (its scores from the q|k|v kernel); otherwise resolve it to `GroupIndices` first.
      options: the decode step's `DecodeOptions`.
      mesh: the tensor-parallel mesh (the kernel then runs in `shard_map`; group indices balanced over its
        "tp" shards), or None on one device.
      residual_bd: when given, the output is `residual_bd + o_proj(ctx)` (in o_proj's epilogue with
        `options.fused_projections`).
      rms, norm_scale: the deferred RMSNorms (`options.deferred_norm`, a fused q|k|v on one device): x_bd is
        `h * g` normalised in the q|k|v kernel by `rms`; with `norm_scale`, o_proj's epilogue also prepares the
        MLP norm's input (`AttnOut.next_normed`).
      page_table_bp: int32 `[B, max_pages]`, a paged cache's page table (one device, no sliding window): the
        new K/V go to slot `lengths_b % S` of page `page_table_bp[b, lengths_b // S]`, and the attention is
        `selective_paged_decode_attention`. None: the contiguous cache.

    Returns:
      `AttnOut(h, k_cache_bhsd, v_cache_bhsd, context_bhd, next_normed)`.
    """
    fused_mm = options.fused_projections and mesh is None
    if isinstance(heads, LinearRouter) and not self.fuses_router(heads, options, mesh):
      raise ValueError("Attention.decode: a LinearRouter needs the fused q|k|v kernel (fuses_router); pass "
                       "GroupIndices(router.select(x)) instead")
    if (rms is not None or norm_scale is not None) and not (self.fuses_qkv(mesh) and fused_mm):
      raise ValueError("Attention.decode: rms= / norm_scale= need a fused q|k|v projection and "
                       "DecodeOptions(fused_projections=True) on one device")
    new_len = lengths_b + 1
    kv_start = None if self.window is None else jnp.maximum(new_len - self.window, 0).astype(jnp.int32)
    impl = options.implementation
    counters = None
    _check_kv8_layout(k_cache_bhsd, mesh)
    k_cache_bhsd, k_scale = kv_cache.split(k_cache_bhsd)
    v_cache_bhsd, v_scale = kv_cache.split(v_cache_bhsd)
    if page_table_bp is not None:
      q_bhd, k_pools, v_pools, heads, counters = self._paged_append(
          x_bd, lengths_b, kv_cache.join(k_cache_bhsd, k_scale), kv_cache.join(v_cache_bhsd, v_scale), page_table_bp,
          heads, options, mesh, rms)
      (k_cache_bhsd, k_scale), (v_cache_bhsd, v_scale) = kv_cache.split(k_pools), kv_cache.split(v_pools)
      ctx = pallas_kernels.selective_paged_decode_attention(q_bhd, k_cache_bhsd, v_cache_bhsd, new_len,
                                                            page_table_bp, _group_indices(heads), scale=self.scale,
                                                            implementation=impl, k_scale=k_scale, v_scale=v_scale)
      ctx = _drop_uncounted_groups(ctx, heads, self.num_kv_heads)
    elif self.fuses_qkv(mesh):
      q_bhd, (k_cache_bhsd, k_scale), (v_cache_bhsd, v_scale), heads, counters = self._fused_qkv_append(
          x_bd, lengths_b, (k_cache_bhsd, k_scale), (v_cache_bhsd, v_scale), heads, options, rms)
      ctx = pallas_kernels.selective_decode_attention(q_bhd, k_cache_bhsd, v_cache_bhsd, new_len,
                                                      _group_indices(heads), scale=self.scale, kv_start=kv_start,
                                                      implementation=impl, group_count=_group_count(heads),
                                                      k_scale=k_scale, v_scale=v_scale)
    elif mesh is None:   # separate q, k, v projections: an XLA scatter of every group's K/V, then attention
      q, k, v = self._qkv(x_bd[:, None, :], lengths_b[:, None])
      out = pallas_kernels.selective_decode_attention_append(
          q[:, 0], k[:, 0], v[:, 0], k_cache_bhsd, v_cache_bhsd, lengths_b, _group_indices(heads),
          scale=self.scale, kv_start=kv_start, implementation=impl, group_count=_group_count(heads),
          k_scale=k_scale, v_scale=v_scale)
      ctx, k_cache_bhsd, v_cache_bhsd = out[:3]
      if k_scale is not None:
        k_scale, v_scale = out[3:]
    else:
      q, k, v = self._qkv(x_bd[:, None, :], lengths_b[:, None])
      k_cache_bhsd, v_cache_bhsd = append_kv_xla(k_cache_bhsd, v_cache_bhsd, k[:, 0], v[:, 0], lengths_b)
      k_cache_bhsd = sharding.constrain_cache(k_cache_bhsd, mesh)
      v_cache_bhsd = sharding.constrain_cache(v_cache_bhsd, mesh)
      idx_bk, count_bs = _shard_group_indices(heads)
      ctx = sharding.sharded_decode_attention(q[:, 0], k_cache_bhsd, v_cache_bhsd, new_len, idx_bk, kv_start,
                                              mesh=mesh, num_groups=self.num_kv_heads, scale=self.scale,
                                              implementation=impl, group_count_bs=count_bs)
    k_cache_bhsd, v_cache_bhsd = kv_cache.join(k_cache_bhsd, k_scale), kv_cache.join(v_cache_bhsd, v_scale)
    if isinstance(heads, OracleHeads):
      ctx = keep_top_groups(ctx, self.num_kv_heads, heads.k, heads.shards, heads.mass, heads.min_groups)
    ctx_bn = ctx.reshape(ctx.shape[0], -1)
    if not fused_mm:
      return AttnOut(self.o_proj(ctx_bn, residual=residual_bd), k_cache_bhsd, v_cache_bhsd, ctx, None)
    out = self.o_proj.decode(ctx_bn, residual=residual_bd, counters=counters, norm_scale=norm_scale,
                             implementation=impl)
    normed = None if norm_scale is None else Normed(out.normed, out.sq_TM)
    return AttnOut(out.y, k_cache_bhsd, v_cache_bhsd, ctx, normed)

  def _paged_append(self, x_bd, lengths_b, k_pages_hpsd, v_pages_hpsd, page_table_bp, heads, options, mesh, rms):
    """q, k, v of the new token (the fused projection where there is one), RoPE at position lengths_b, and every
    group's K/V written into the row's page. Returns (q_bhd, pools, heads, counters) as `_fused_qkv_append`."""
    if mesh is not None or self.window is not None:
      raise ValueError("Attention.decode: the paged KV cache runs on one device without a sliding window; use the "
                       "contiguous KVCache")
    counters = None
    if self.fuses_qkv(mesh):
      qkv_bn, heads, counters = self._fused_qkv(x_bd, heads, options, rms)
      q, k, v = (y.reshape(y.shape[0], 1, -1, self.head_dim)
                 for y in split_qkv(qkv_bn, self.num_heads, self.num_kv_heads, self.head_dim))
      if self.use_rope:
        cos, sin = rope.rope_cos_sin(lengths_b[:, None], np.asarray(self.inv_freq, np.float32))
        q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
    else:
      q, k, v = self._qkv(x_bd[:, None, :], lengths_b[:, None])
    k_pages_hpsd = paged_kv_cache.write_token(k_pages_hpsd, k[:, 0], page_table_bp, lengths_b)
    v_pages_hpsd = paged_kv_cache.write_token(v_pages_hpsd, v[:, 0], page_table_bp, lengths_b)
    return q[:, 0], k_pages_hpsd, v_pages_hpsd, heads, counters

  def _fused_qkv(self, x_bd, heads, options, rms):
    """The fused q|k|v projection `[B, G*(r+2)*D]` (a linear router's scores and top-k from extra programs of its
    kernel; zeroed split-K counters handed on to o_proj). Returns (qkv_bn, heads with a fused router resolved to
    `GroupIndices`, counters)."""
    router = heads if isinstance(heads, LinearRouter) else None
    counters = None
    if options.fused_projections or router is not None:
      side = None
      if router is not None:   # the kernel ranks the scores itself, except for balanced or adaptive selections
        topk = (router.num_groups, router.k) if router.shards == 1 and router.mass is None else None
        side = pallas_kernels.Side(*router.side, topk=topk)
      out = self.qkv_proj.decode(x_bd, side=side, emit_counters=options.fused_projections, rms=rms,
                                 implementation=options.implementation if options.fused_projections else "xla")
      qkv_bn, counters = out.y, out.counters
      if router is not None:
        heads = GroupIndices(out.side) if side.topk is not None else router.choose(out.side)
    else:
      qkv_bn = self.qkv_proj(x_bd)
    return qkv_bn, heads, counters

  def _fused_qkv_append(self, x_bd, lengths_b, k_split, v_split, heads, options, rms):
    """`_fused_qkv`, then q/k rotation and the K/V cache write at slot lengths_b (`rope_append`). `k_split`,
    `v_split`: (cache, scale or None) as `kv_cache.split`. Returns (q_bhd, (k_cache, k_scale), (v_cache, v_scale),
    heads with a fused router resolved to `GroupIndices`, counters)."""
    qkv_bn, heads, counters = self._fused_qkv(x_bd, heads, options, rms)
    inv_freq = None if self.inv_freq is None else jnp.asarray(self.inv_freq, jnp.float32)
    out = pallas_kernels.rope_append(qkv_bn, lengths_b, inv_freq, k_split[0], v_split[0], num_heads=self.num_heads,
                                     implementation=options.implementation, k_scale=k_split[1], v_scale=v_split[1])
    scales = (None, None) if k_split[1] is None else out[3:]
    return out[0], (out[1], scales[0]), (out[2], scales[1]), heads, counters


def _check_kv8_layout(k_cache, mesh) -> None:
  """ValueError for an 8-bit cache where it is not supported: tensor parallelism."""
  if kv_cache.is_quantised(k_cache) and mesh is not None:
    raise ValueError("an 8-bit KV cache (kv_dtype int8 / float8_e4m3fn) runs on one device; use the model's dtype "
                     "for the cache of a tensor-parallel model")


def _group_indices(heads: HeadSelection):
  """The attention kernels' `group_idx` on one device: int32 `[B, K]`, or None for every group (dense and the
  oracle)."""
  return heads.rows().idx_bk if isinstance(heads, GroupIndices) else None


def _shard_group_indices(heads: HeadSelection):
  """(`group_idx` in the balanced per-shard layout or None, per-shard counts int32 `[B, S]` or None) for the
  sharded attention."""
  if not isinstance(heads, GroupIndices):
    return None, None
  if heads.count_b is not None:   # one shard's count (tp 1)
    return heads.idx_bk, heads.count_b[:, None]
  return heads.idx_bk, heads.count_bs


def _drop_uncounted_groups(ctx_bhd, heads: HeadSelection, num_groups: int):
  """Zeroes the heads of groups a per-row count leaves out (adaptive budgets: a row keeps only its first
  `count_b[b]` selected groups); the paged kernel attends over all K."""
  count_b = _group_count(heads)
  if count_b is None:
    return ctx_bhd
  b, hq, d = ctx_bhd.shape
  idx_bk = _group_indices(heads)
  kept_bk = jnp.arange(idx_bk.shape[1])[None, :] < count_b[:, None]
  keep_bg = jnp.zeros((b, num_groups), bool).at[jnp.arange(b)[:, None], idx_bk].max(kept_bk)
  keep_bh = jnp.repeat(keep_bg, hq // num_groups, axis=1)
  return jnp.where(keep_bh[:, :, None], ctx_bhd, jnp.zeros((), ctx_bhd.dtype))


def _group_count(heads: HeadSelection):
  """The attention kernels' `group_count`: int32 `[B]` (adaptive budgets), or None for all K slots."""
  return heads.rows().count_b if isinstance(heads, GroupIndices) else None


class Normed(NamedTuple):
  """A deferred RMSNorm's input as the kernel before it left it: `h * g` and h's squares (float32 `[T, B]`)."""

  x_bd: jax.Array
  sq_TB: jax.Array


class AttnOut(NamedTuple):
  """`Attention.decode`'s result.

  h: `[B, d]` the attention output (plus the residual when one was given).
  k_cache_bhsd, v_cache_bhsd: the layer's caches with the new token written.
  context_bhd: the attention context before o_proj (the oracle's: after its group mask).
  next_normed: with `norm_scale`, the next norm's input (`Normed`) from o_proj's epilogue; else None.
  """

  h: jax.Array
  k_cache_bhsd: jax.Array
  v_cache_bhsd: jax.Array
  context_bhd: jax.Array
  next_normed: Normed | None
