"""Public selective decode attention: validation, dispatch, partial merging."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _platform
from pallas_kernels import kv_quant
from pallas_kernels import decode_attention_persistent as _persistent
from pallas_kernels import decode_attention_triton as _triton
from pallas_kernels import decode_attention_xla as _xla

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _resolve_config(config, batch: int, num_selected: int, seq_len: int, head_dim: int,
                    itemsize: int) -> _triton.AttentionConfig:
  """The `AttentionConfig` to run: `config` itself, or chosen from the shapes by `config`'s rules
  (an `AttentionHeuristics`; None: the default rules)."""
  _check_config(config)
  if isinstance(config, _triton.AttentionConfig):
    return config
  return _triton.choose_config(batch, num_selected, seq_len, head_dim, itemsize,
                               heuristics=config or _triton.AttentionHeuristics())


def _check_config(config):
  if config is not None and not isinstance(config, (_triton.AttentionConfig, _triton.AttentionHeuristics)):
    raise TypeError(f"config must be an AttentionConfig, an AttentionHeuristics or None, got "
                    f"{type(config).__name__}")


def _check_int(name, x):
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must have an integer dtype, got {x.dtype}")


def _validate(q, k_cache, v_cache, lengths, group_idx, kv_start, appending=False, group_count=None, k_scale=None,
              v_scale=None):
  if q.ndim != 3:
    raise ValueError(f"q must be [B, Hq, D], got shape {q.shape}")
  if k_cache.ndim != 4 or v_cache.ndim != 4:
    raise ValueError("k_cache and v_cache must be [B, Hkv, S, D], got shapes "
                     f"{k_cache.shape} and {v_cache.shape}")
  if k_cache.shape != v_cache.shape:
    raise ValueError(f"k_cache shape {k_cache.shape} != v_cache shape "
                     f"{v_cache.shape}")
  B, Hq, D = q.shape
  Bk, Hkv, S, Dk = k_cache.shape
  if Bk != B or Dk != D:
    raise ValueError(f"q {q.shape} and k_cache {k_cache.shape} disagree on the "
                     "batch size or head_dim")
  if Hq % Hkv:
    raise ValueError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
  kv8 = kv_quant.is_8bit(k_cache.dtype) and k_cache.dtype == v_cache.dtype
  if not kv8 and not (q.dtype == k_cache.dtype == v_cache.dtype):
    raise ValueError(f"q, k_cache, v_cache dtypes differ: {q.dtype}, "
                     f"{k_cache.dtype}, {v_cache.dtype} (the caches: q's dtype, or both one 8-bit dtype "
                     f"{kv_quant.KV8_DTYPES} with scales)")
  kv_quant.check_scales("k_cache", k_cache, k_scale)
  kv_quant.check_scales("v_cache", v_cache, v_scale)
  if q.dtype not in _FLOAT_DTYPES:
    raise ValueError(f"unsupported dtype {q.dtype}; use float32, bfloat16 or "
                     "float16")
  if lengths.shape != (B,):
    raise ValueError(f"lengths must have shape ({B},), got {lengths.shape}")
  _check_int("lengths", lengths)
  if kv_start is not None:
    if kv_start.shape != (B,):
      raise ValueError(f"kv_start must have shape ({B},), got {kv_start.shape}")
    _check_int("kv_start", kv_start)
  if group_idx is not None:
    if group_idx.ndim != 2 or group_idx.shape[0] != B:
      raise ValueError(f"group_idx must be [B={B}, K], got {group_idx.shape}")
    _check_int("group_idx", group_idx)
    K = group_idx.shape[1]
    if not 1 <= K <= Hkv:
      raise ValueError(f"group_idx selects K={K} groups; need 1 <= K <= "
                       f"Hkv={Hkv}")
    if _platform.is_concrete(group_idx):
      g = np.asarray(group_idx)
      if g.size and (g.min() < 0 or g.max() >= Hkv):
        raise ValueError(f"group_idx values must lie in [0, {Hkv}), got range "
                         f"[{g.min()}, {g.max()}]")
  if group_count is not None:
    if group_idx is None:
      raise ValueError("group_count needs group_idx (the [B, K] slots it counts)")
    if group_count.shape != (B,):
      raise ValueError(f"group_count must have shape ({B},), got {group_count.shape}")
    _check_int("group_count", group_count)
    if _platform.is_concrete(group_count):
      c = np.asarray(group_count)
      K = group_idx.shape[1]
      if c.size and (c.min() < 1 or c.max() > K):
        raise ValueError(f"group_count values must lie in [1, K={K}], got range [{c.min()}, {c.max()}]")
  if _platform.is_concrete(lengths):
    n = np.asarray(lengths)
    if n.size and (n.min() < 0 or n.max() > S):
      what = "tokens already cached (the new token's slot)" if appending else "lengths"
      raise ValueError(f"{what} must lie in [0, S={S}], got range "
                       f"[{n.min()}, {n.max()}]")


def _scatter_groups(o_BKGD, m_BKG, l_BKG, group_idx_BK, num_kv_heads):
  """Places per-selected-group results at their groups; others o=0, l=0 (an index of num_kv_heads: dropped)."""
  B, _, G, D = o_BKGD.shape
  rows_B1 = jnp.arange(B)[:, None]
  o = jnp.zeros((B, num_kv_heads, G, D), jnp.float32).at[
      rows_B1, group_idx_BK].set(o_BKGD, mode="drop")
  m = jnp.full((B, num_kv_heads, G), _xla.M_EMPTY, jnp.float32).at[
      rows_B1, group_idx_BK].set(m_BKG, mode="drop")
  l = jnp.zeros((B, num_kv_heads, G), jnp.float32).at[
      rows_B1, group_idx_BK].set(l_BKG, mode="drop")
  return (o.reshape(B, num_kv_heads * G, D), m.reshape(B, -1),
          l.reshape(B, -1))


@functools.partial(jax.jit, static_argnames=("scale", "return_residuals",
                                             "config", "interpret"))
def _pallas_path(q, k_cache, v_cache, lengths, group_idx, kv_start, group_count=None, k_scale=None, v_scale=None, *,
                 scale, return_residuals, config, interpret):
  B, Hq, D = q.shape
  Hkv = k_cache.shape[1]
  dense = group_idx is None
  S = k_cache.shape[2]
  if (config.num_splits == 1 and config.persistent and not return_residuals
      and _persistent.supports(S, D, config.block_k, k_cache.size)):
    # A few programs per SM, each looping over a run of (row, group) items; normalised output in place.
    return _persistent.decode_attention_persistent(
        q, k_cache, v_cache, lengths, group_idx, kv_start, scale=scale, config=config, interpret=interpret,
        group_count_B=group_count, k_scale_BHS=k_scale, v_scale_BHS=v_scale)
  if config.num_splits == 1 and not return_residuals:
    # One program per (row, group), normalised output in place: no merge, normalise or scatter after it.
    return _triton.decode_attention_triton_direct(
        q, k_cache, v_cache, lengths, None if dense else group_idx, kv_start, scale=scale, config=config,
        interpret=interpret, group_count_B=group_count, k_scale_BHS=k_scale, v_scale_BHS=v_scale)
  if dense:
    group_idx = jnp.broadcast_to(jnp.arange(Hkv, dtype=jnp.int32), (B, Hkv))
  group_idx = jnp.clip(group_idx.astype(jnp.int32), 0, Hkv - 1)
  o, m, l = _triton.decode_attention_triton(
      q, k_cache, v_cache, lengths, group_idx, kv_start, scale=scale,
      config=config, interpret=interpret, group_count_B=group_count, k_scale_BHS=k_scale, v_scale_BHS=v_scale)
  if group_count is not None:   # uncounted slots scatter nowhere (index Hkv, dropped): their groups stay zero
    group_idx = jnp.where(_xla.count_mask(group_count, group_idx.shape[1]), group_idx, Hkv)
  if dense:  # groups already in order: no scatter
    o, m, l = o.reshape(B, Hq, D), m.reshape(B, Hq), l.reshape(B, Hq)
  elif not return_residuals:
    # The decode step's path: normalise the K selected groups, then one scatter of the result into zeros
    # (instead of three float32 scatters of o, m, l and a normalise over every head).
    o_BKGD = _xla.normalise(o, l).astype(q.dtype)
    out = jnp.zeros((B, Hkv) + o_BKGD.shape[2:], q.dtype).at[jnp.arange(B)[:, None], group_idx].set(
        o_BKGD, mode="drop")
    return out.reshape(B, Hq, D)
  else:
    o, m, l = _scatter_groups(o, m, l, group_idx, Hkv)
  if return_residuals:
    return o, m, l
  return _xla.normalise(o, l).astype(q.dtype)


def selective_decode_attention(q, k_cache, v_cache, lengths, group_idx=None, *,
                               scale=None, kv_start=None,
                               return_residuals=False, implementation=None,
                               config=None, group_count=None, k_scale=None, v_scale=None):
  """Decode attention (one query token) over the selected KV groups of each row.

  Args:
    q: [B, Hq, D] query of the current token (bf16, fp16 or float32).
    k_cache, v_cache: [B, Hkv, S, D] head-major caches, same dtype as q, or both int8 / float8_e4m3fn with
      `k_scale` / `v_scale` (an 8-bit cache, `pallas_kernels.kv_quant`: dequantised in registers).
    lengths: [B] int, keys [kv_start, lengths[b]) of row b are attended (0..S;
      rows with an empty range produce 0).
    group_idx: [B, K] int, distinct selected KV groups per row (= heads for MHA),
      any order, 1 <= K <= Hkv. Query head h belongs to group h // (Hq // Hkv).
      None selects every group (dense decode attention). Out-of-range values
      raise when concrete; under jit they are clamped to [0, Hkv).
    scale: softmax scale, default D ** -0.5.
    kv_start: optional [B] int, keys before it are ignored (sliding window).
    return_residuals: return (o_unnormalised [B,Hq,D] f32, m [B,Hq] f32,
      l [B,Hq] f32) to merge with other partials (`merge_attention_partials`).
      Unselected heads have o = 0, l = 0 and a finite very negative m.
    implementation: None (pallas on GPU, xla elsewhere), "pallas" (interpret
      mode off GPU) or "xla".
    config: "pallas" only: an `AttentionConfig` (the kernel and its tiling, as given), an
      `AttentionHeuristics` (rules that choose one from the shapes, e.g. `AttentionHeuristics(persistent=False)`
      for one direct program per (row, group)) or None (the default rules).
    group_count: optional [B] int (adaptive budgets), with `group_idx`: row b
      attends only to `group_idx[b, :group_count[b]]`, 1 <= group_count <= K;
      the other slots' groups count as unselected. Values outside [1, K]
      raise when concrete; under jit they are clamped to [0, K]. The kernel
      reads only the counted groups' K/V (the persistent kernel's programs
      share the counted items), so its bytes follow the realised density;
      the compiled program depends on K only, not on the counts.
    k_scale, v_scale: float32 [B, Hkv, S], an 8-bit cache's per (row, group, slot) scales; None for a float cache.

  Returns:
    [B, Hq, D] in q's dtype; query heads of unselected groups are exactly 0.
  """
  impl = _platform.resolve_implementation(implementation)
  lengths = jnp.asarray(lengths)
  group_idx = None if group_idx is None else jnp.asarray(group_idx)
  kv_start = None if kv_start is None else jnp.asarray(kv_start)
  group_count = None if group_count is None else jnp.asarray(group_count)
  _validate(q, k_cache, v_cache, lengths, group_idx, kv_start, group_count=group_count, k_scale=k_scale,
            v_scale=v_scale)
  _check_config(config)
  B, Hq, D = q.shape
  Hkv, S = k_cache.shape[1], k_cache.shape[2]
  scale = float(D ** -0.5 if scale is None else scale)
  if impl == "xla":
    return _xla_jit(q, k_cache, v_cache, lengths, group_idx, kv_start,
                    scale=scale, return_residuals=return_residuals, group_count_B=group_count,
                    k_scale_BHS=k_scale, v_scale_BHS=v_scale)
  if kv_start is None:
    kv_start = jnp.zeros((B,), jnp.int32)
  K = Hkv if group_idx is None else group_idx.shape[1]
  config = _resolve_config(config, B, K, S, D, jnp.dtype(k_cache.dtype).itemsize)
  return _pallas_path(q, k_cache, v_cache, lengths, group_idx, kv_start, group_count, k_scale, v_scale,
                      scale=scale, return_residuals=return_residuals,
                      config=config, interpret=_platform.interpret_mode())


_xla_jit = jax.jit(_xla.decode_attention_xla,
                   static_argnames=("scale", "return_residuals"))


def selective_decode_attention_append(q, k_new, v_new, k_cache, v_cache, lengths, group_idx=None, *,
                                      scale=None, kv_start=None, implementation=None, config=None,
                                      group_count=None, k_scale=None, v_scale=None):
  """Appends one token's K/V to every group of the cache, then attends over the selected groups.

  The decode step's attention: equal to writing `k_new`/`v_new` at slot `lengths[b]` of each row (every
  group, selected or not, so that a group skipped now can be selected later) and then calling
  `selective_decode_attention(q, k_cache, v_cache, lengths + 1, group_idx, ...)`: one XLA scatter per cache,
  then the same attention kernels.

  Args:
    q: [B, Hq, D] query of the new token.
    k_new, v_new: [B, Hkv, D] its key and value (cast to the cache dtype).
    k_cache, v_cache: [B, Hkv, S, D] caches; updated in place when the caller donates them (or, under jit,
      when they are dead after the call).
    lengths: [B] int, tokens already in each row's cache = the new token's slot. A slot outside [0, S) is
      not written (as `mode="drop"`), and the row attends over its min(lengths + 1, S) cached keys.
    group_idx, scale, kv_start, implementation, config, group_count: as `selective_decode_attention`.
    k_scale, v_scale: an 8-bit cache's scales (as `selective_decode_attention`): the new K/V are quantised
      (`kv_quant.quantise`) and written with their scales.

  Returns:
    (out [B, Hq, D] in q's dtype (heads of unselected groups exactly 0), k_cache, v_cache), and after them
    (k_scale, v_scale) for an 8-bit cache.
  """
  impl = _platform.resolve_implementation(implementation)
  lengths = jnp.asarray(lengths)
  group_idx = None if group_idx is None else jnp.asarray(group_idx)
  kv_start = None if kv_start is None else jnp.asarray(kv_start)
  group_count = None if group_count is None else jnp.asarray(group_count)
  _validate(q, k_cache, v_cache, lengths, group_idx, kv_start, appending=True, group_count=group_count,
            k_scale=k_scale, v_scale=v_scale)
  _check_config(config)
  B, _, D = q.shape
  Hkv, S = k_cache.shape[1], k_cache.shape[2]
  if k_new.shape != (B, Hkv, D) or v_new.shape != (B, Hkv, D):
    raise ValueError(f"k_new and v_new must be [B, Hkv, D] = {(B, Hkv, D)}, got {k_new.shape} and {v_new.shape}")
  scale = float(D ** -0.5 if scale is None else scale)
  if impl == "xla":
    return _append_xla_jit(q, k_new, v_new, k_cache, v_cache, lengths, group_idx, kv_start, scale=scale,
                           group_count_B=group_count, k_scale_BHS=k_scale, v_scale_BHS=v_scale)
  if kv_start is None:
    kv_start = jnp.zeros((B,), jnp.int32)
  K = Hkv if group_idx is None else group_idx.shape[1]
  config = _resolve_config(config, B, K, S, D, jnp.dtype(k_cache.dtype).itemsize)
  if k_scale is None:
    k_cache, v_cache = _xla.append_kv_xla(k_cache, v_cache, k_new, v_new, lengths)
  else:
    k_cache, v_cache, k_scale, v_scale = _xla.append_kv8_xla(k_cache, v_cache, k_scale, v_scale, k_new, v_new,
                                                             lengths)
  out = _pallas_path(q, k_cache, v_cache, lengths.astype(jnp.int32) + 1, group_idx, kv_start, group_count,
                     k_scale, v_scale, scale=scale, return_residuals=False, config=config,
                     interpret=_platform.interpret_mode())
  if k_scale is None:
    return out, k_cache, v_cache
  return out, k_cache, v_cache, k_scale, v_scale


_append_xla_jit = jax.jit(_xla.decode_attention_append_xla, static_argnames=("scale",))


def merge_attention_partials(parts, out_dtype=jnp.float32):
  """Merges residual triples from disjoint key ranges or shards.

  Args:
    parts: sequence of (o_unnormalised [..., D], m [...], l [...]) as returned
      with `return_residuals=True` (e.g. one per tensor-parallel shard or KV
      chunk).
    out_dtype: dtype of the result.

  Returns:
    [..., D] normalised attention output; 0 where every part is empty.
  """
  parts = list(parts)
  if not parts:
    raise ValueError("merge_attention_partials needs at least one part")
  return _xla.merge_partials(parts).astype(out_dtype)
