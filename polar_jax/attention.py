"""Multi-head / grouped-query self-attention with a head-major KV cache.

Prefill runs dense causal attention over a compacted (right-padded) prompt and writes K/V of
every head to the cache. Decode writes the new token's K/V to every head's slot (`pallas_kernels.rope_append`
after a fused q|k|v projection, else `selective_decode_attention_append`), then attends over the selected KV
groups (all when none are given) with `pallas_kernels.selective_decode_attention`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from pallas_kernels.decode_attention_xla import append_kv_xla
from polar_jax import kv_cache, layers, rope
from polar_jax.config import ModelConfig
from polar_jax.fusion import split_qkv
from polar_jax.layers import Linear

# Decode with a fused q|k|v projection on one device: q/k rotation and the K/V cache write as one kernel
# (`pallas_kernels.rope_append`) instead of XLA's RoPE fusion and two scatters. Off: the XLA path (A/B runs).
FUSED_ROPE_APPEND = True
# With layers.DECODE_MATMUL: the RoPE + K/V append in the q|k|v kernel's epilogue (`pallas_kernels.qkv_rope_append`,
# one kernel instead of skinny_matmul + rope_append). Off: measured within noise on one H100 (session 10, LLaMA-2-7B
# p2000 density 0.5, three A/B pairs in two calls, `e2e_experiments.jsonl`): B16 +0.15 to +0.6%, B32 -0.35 to +0.1%.
ROPE_IN_QKV = False
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
  """Self-attention of one layer: dense q/k/v/o projections, RoPE or none (OPT)."""

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

  def prefill(self, x_btd, lengths_b, k_cache_bhsd, v_cache_bhsd, row0=0):
    """Attention over compacted prompts (cache rows [row0, row0 + B)); writes every head's K/V into slots [0, T)."""
    out, (k, v) = self.forward(x_btd, lengths_b)
    k_cache_bhsd = kv_cache.write_prefill(k_cache_bhsd, k, row0)
    v_cache_bhsd = kv_cache.write_prefill(v_cache_bhsd, v, row0)
    if getattr(self, "mesh", None) is not None:   # tensor parallel: cache sharded by KV group (polar_jax.sharding)
      from polar_jax import sharding
      k_cache_bhsd = sharding.constrain_cache(k_cache_bhsd, self.mesh, getattr(self, "dp", 1))
      v_cache_bhsd = sharding.constrain_cache(v_cache_bhsd, self.mesh, getattr(self, "dp", 1))
    return out, k_cache_bhsd, v_cache_bhsd

  @property
  def fused_qkv_decode(self) -> bool:
    """Whether `decode` writes K/V with `rope_append` after a fused q|k|v projection (one device); only then does
    it take `router=`."""
    return self.qkv_proj is not None and FUSED_ROPE_APPEND and getattr(self, "mesh", None) is None

  def decode(self, x_bd, lengths_b, k_cache_bhsd, v_cache_bhsd, group_idx_bk=None, *,
             implementation=None, return_context=False, residual_bd=None, router=None, rms=None, norm_scale=None):
    """One decode step: writes K/V of every head at slot lengths_b, attends over the selected groups.

    Args:
      x_bd: `[B, d]` normed hidden state of the new token.
      lengths_b: int32 `[B]` tokens already in the cache (= the new token's position).
      k_cache_bhsd, v_cache_bhsd: this layer's caches.
      group_idx_bk: int32 `[B, K]` selected KV groups per row, None for all (dense), or a Python int k:
        the oracle, which attends densely and keeps each row's k groups of largest output norm (the norm
        over the group's query heads' contexts), zeroing the other heads before o_proj; or a tuple
        (k, shards): the oracle with balanced per-shard selection. Under tensor parallelism (`self.mesh`, set by
        `polar_jax.sharding`) the kernel runs in `shard_map` and group_idx must be balanced over tp shards.
      implementation: passed to the kernels ("pallas", "xla" or None = best for the platform).
      return_context: also return the attention context `[B, Hq, D]` before o_proj.
      residual_bd: when given, the output is `residual_bd + o_proj(ctx)` (added in o_proj's epilogue on one
        device, `layers.DECODE_MATMUL`).
      router: `(w_dg, b_g, pick[, topk])`: the group selection is `pick(x @ w_dg + b_g)`, the scores computed by
        the q|k|v kernel (`fused_qkv_decode` only; replaces group_idx_bk); with `topk=(G, k)` (not None), `pick`
        is each row's top-k of the first G scores (`rank_topk`) and the kernel's epilogue computes it.
      rms, norm_scale: the deferred RMSNorms (`layers.DEFERRED_NORM`; `fused_qkv_decode` with
        `layers.DECODE_MATMUL` only): x_bd is `h * g` and `rms=(sq_TM, eps)` normalises it in the q|k|v kernel
        (the router's scores too); with `norm_scale`, the first result is `(out, out * norm_scale, sq_TM)` from
        o_proj's epilogue, the MLP norm's input prepared the same way.
    """
    new_len = lengths_b + 1
    kv_start = None if self.window is None else jnp.maximum(new_len - self.window, 0).astype(jnp.int32)
    oracle_k, shards = group_idx_bk if isinstance(group_idx_bk, tuple) else (group_idx_bk, 1)
    oracle_k = oracle_k if isinstance(oracle_k, int) else None
    mesh = getattr(self, "mesh", None)   # set by polar_jax.sharding (tensor parallel); None on one device
    if router is not None and not self.fused_qkv_decode:
      raise ValueError("Attention.decode: router= needs a fused q|k|v projection on one device")
    if (rms is not None or norm_scale is not None) and not (self.fused_qkv_decode and layers.DECODE_MATMUL):
      raise ValueError("Attention.decode: rms= / norm_scale= need a fused q|k|v projection and "
                       "layers.DECODE_MATMUL on one device")
    finish = functools.partial(self._finish_decode, oracle_k=oracle_k, return_context=return_context,
                               residual_bd=residual_bd, norm_scale=norm_scale, implementation=implementation)
    rms_sq, rms_eps = rms if rms is not None else (None, None)
    if self.fused_qkv_decode:
      # The fused projection (the router's scores from extra programs; zeroed split-K counters handed on to
      # o_proj), then q/k rotation and the K/V cache write at slot lengths_b: one kernel for both with
      # ROPE_IN_QKV, else skinny_matmul (XLA's dot when the kernels are switched off) and `rope_append`.
      inv_freq = None if self.inv_freq is None else jnp.asarray(self.inv_freq, jnp.float32)
      mm_impl = implementation if layers.DECODE_MATMUL else "xla"
      side = None if router is None else router[:2]
      side_topk = router[3] if router is not None and len(router) > 3 else None
      chain = layers.DECODE_MATMUL and layers.CHAINED_COUNTERS
      if layers.DECODE_MATMUL and ROPE_IN_QKV:
        bias = None if self.qkv_proj.bias is None else self.qkv_proj.bias[...]
        q_bhd, k_cache_bhsd, v_cache_bhsd, *rest = pallas_kernels.qkv_rope_append(
            x_bd, self.qkv_proj.kernel[...], bias, lengths_b, inv_freq, k_cache_bhsd, v_cache_bhsd,
            num_heads=self.num_heads, side_w_KP=None if side is None else side[0],
            side_b_P=None if side is None else side[1], rms_sq_TM=rms_sq, rms_eps=rms_eps, side_topk=side_topk,
            emit_counters=chain, implementation=implementation)
      else:
        if layers.DECODE_MATMUL or router is not None:
          out = self.qkv_proj.decode(x_bd, side=side, emit_counters=chain, rms=rms, side_topk=side_topk,
                                     implementation=mm_impl)
          qkv_bn, *rest = out if isinstance(out, tuple) else (out,)
        else:
          qkv_bn, rest = self.qkv_proj(x_bd), []
        q_bhd, k_cache_bhsd, v_cache_bhsd = pallas_kernels.rope_append(
            qkv_bn, lengths_b, inv_freq, k_cache_bhsd, v_cache_bhsd, num_heads=self.num_heads,
            implementation=implementation)
      if router is not None:
        group_idx_bk = rest.pop(0) if side_topk is not None else router[2](rest.pop(0))
      ctx = pallas_kernels.selective_decode_attention(
          q_bhd, k_cache_bhsd, v_cache_bhsd, new_len, None if oracle_k else group_idx_bk, scale=self.scale,
          kv_start=kv_start, implementation=implementation)
      return finish(ctx, k_cache_bhsd, v_cache_bhsd, shards=shards, skinny=layers.DECODE_MATMUL,
                    counters=rest.pop(0) if chain else None)
    q, k, v = self._qkv(x_bd[:, None, :], lengths_b[:, None])
    if mesh is None:
      # K/V of every group go to slot lengths_b (an XLA scatter, or the direct kernel with append_in_kernel), then
      # attention over the selected groups.
      ctx, k_cache_bhsd, v_cache_bhsd = pallas_kernels.selective_decode_attention_append(
          q[:, 0], k[:, 0], v[:, 0], k_cache_bhsd, v_cache_bhsd, lengths_b, None if oracle_k else group_idx_bk,
          scale=self.scale, kv_start=kv_start, implementation=implementation)
      return finish(ctx, k_cache_bhsd, v_cache_bhsd, shards=shards, skinny=layers.DECODE_MATMUL)
    else:
      from polar_jax import sharding
      k_cache_bhsd, v_cache_bhsd = append_kv_xla(k_cache_bhsd, v_cache_bhsd, k[:, 0], v[:, 0], lengths_b)
      dp = getattr(self, "dp", 1)
      k_cache_bhsd = sharding.constrain_cache(k_cache_bhsd, mesh, dp)
      v_cache_bhsd = sharding.constrain_cache(v_cache_bhsd, mesh, dp)
      shards = sharding.mesh_tp(mesh)
      ctx = sharding.sharded_decode_attention(
          q[:, 0], k_cache_bhsd, v_cache_bhsd, new_len, None if oracle_k else group_idx_bk, kv_start, mesh=mesh,
          dp=dp, num_groups=self.num_kv_heads, scale=self.scale, implementation=implementation)
    return finish(ctx, k_cache_bhsd, v_cache_bhsd, shards=shards, skinny=False)

  def _finish_decode(self, ctx, k_cache_bhsd, v_cache_bhsd, *, oracle_k, shards, return_context, residual_bd,
                     implementation, skinny, counters=None, norm_scale=None):
    if oracle_k:
      ctx = keep_top_groups(ctx, self.num_kv_heads, oracle_k, shards=shards)
    ctx_bn = ctx.reshape(ctx.shape[0], -1)
    out = (self.o_proj.decode(ctx_bn, residual=residual_bd, counters=counters, norm_scale=norm_scale,
                              implementation=implementation)
           if skinny else self.o_proj(ctx_bn, residual=residual_bd))
    if return_context:
      return out, k_cache_bhsd, v_cache_bhsd, ctx
    return out, k_cache_bhsd, v_cache_bhsd


def group_norms(ctx_bhd: jax.Array, num_kv_heads: int) -> jax.Array:
  """float32 `[B, G]` (leading dims kept): L2 norm of each KV group's query-head contexts before o_proj."""
  *lead, hq, d = ctx_bhd.shape
  c = ctx_bhd.astype(jnp.float32).reshape(*lead, num_kv_heads, (hq // num_kv_heads) * d)
  return jnp.sqrt(jnp.sum(c * c, axis=-1))


def keep_top_groups(ctx_bhd: jax.Array, num_kv_heads: int, k: int, shards: int = 1) -> jax.Array:
  """The oracle: zeroes the query heads of all but each row's k groups of largest output norm.

  `shards > 1`: balanced per-shard selection (k / shards groups from each of `shards` equal blocks of groups,
  `polar_jax.sharding.balanced_topk`), the selection tensor-parallel decoding uses."""
  from polar_jax.sharding import balanced_topk
  b, hq, _ = ctx_bhd.shape
  top_bk = balanced_topk(group_norms(ctx_bhd, num_kv_heads), k, shards)
  keep_bg = jnp.zeros((b, num_kv_heads), bool).at[jnp.arange(b)[:, None], top_bk].set(True)
  keep_bh = jnp.repeat(keep_bg, hq // num_kv_heads, axis=1)
  return jnp.where(keep_bh[..., None], ctx_bhd, jnp.zeros_like(ctx_bhd))
