"""Which KV groups the sparse decode step selects: a probe the engine runs every few sparse rounds.

The probe runs one sparse decode step's layers from the running batch's state (`SparseDecode.plans`, then each
layer's `decode` with the selection resolved to group indices) and counts, per layer and KV group, the active rows
that select it. It writes the new token's K/V at each row's length, which the next real step writes with the same
values, and leaves the lengths and every other field alone, so the batch's state means the same afterwards.
Selectors "router" and "random" are probed (with adaptive budgets, each row's counted groups only); the oracle
(dense attention, then a top-k by output norm) is not. The mean of the rates over a layer's groups is the fraction
of its KV the probed rows read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from polar_jax.kv_cache import KVCache
from polar_jax.paged_kv_cache import PagedKVCache
from polar_jax.selection import DenseHeads, GroupIndices, LayerPlan, LinearRouter


def probes(decode) -> bool:
  """Whether `decode` (a decode-step object) makes selections the probe can count."""
  return getattr(decode, "selector", None) in ("router", "random") and hasattr(decode, "plans")


def _selected(layer, plan: LayerPlan, h_bd, num_groups: int) -> GroupIndices:
  """The group indices a layer's plan selects (every group for a dense layer); with adaptive budgets, row b uses
  only the first `count_b[b]`."""
  heads = plan.heads
  if isinstance(heads, GroupIndices):
    return heads
  if isinstance(heads, LinearRouter):
    x_bd = layer.attn_norm(h_bd) if layer.pre_norm else h_bd
    return heads.groups(x_bd)
  if isinstance(heads, DenseHeads):
    return GroupIndices(jnp.broadcast_to(jnp.arange(num_groups, dtype=jnp.int32), (h_bd.shape[0], num_groups)))
  raise TypeError(f"the selection probe cannot count {type(heads).__name__} selections")


def _hits_g(sel: GroupIndices, active_b, num_groups: int) -> jax.Array:
  """int32 `[G]`: active rows selecting each group."""
  sel = sel.rows()
  b, k = sel.idx_bk.shape
  used_bk = jnp.broadcast_to(active_b[:, None], (b, k))
  if sel.count_b is not None:
    used_bk = used_bk & (jnp.arange(k)[None, :] < sel.count_b[:, None])
  hits_bg = jnp.zeros((b, num_groups), jnp.int32).at[jnp.arange(b)[:, None], sel.idx_bk].max(
      used_bk.astype(jnp.int32))
  return jnp.sum(hits_bg, axis=0)


def count_selections(model, decode, decode_state, tok_b, cache: KVCache | PagedKVCache, active_b
                     ) -> tuple[KVCache | PagedKVCache, jax.Array]:
  """(cache with the step's K/V written at each row's length, int32 `[L, G]` active rows selecting each group)."""
  table = cache.page_table_bp if isinstance(cache, PagedKVCache) else None
  num_groups = model.config.num_kv_heads
  plans = decode.plans(model, tok_b, cache.lengths_b, decode_state, active_b)
  h = model.embed_tokens(tok_b, cache.lengths_b)
  ks, vs, counts = [], [], []
  for i, layer in enumerate(model.layers):
    sel = _selected(layer, plans[i], h, num_groups)
    counts.append(_hits_g(sel, active_b, num_groups))
    plan = LayerPlan(plans[i].heads if isinstance(plans[i].heads, DenseHeads) else sel, plans[i].neurons)
    out = layer.decode(h, cache.lengths_b, *cache.layer_kv(i), plan, options=decode.options, mesh=decode.mesh,
                       page_table_bp=table)
    h = out.h
    ks.append(out.k_cache_bhsd)
    vs.append(out.v_cache_bhsd)
  return cache.with_layers(ks, vs, cache.lengths_b), jnp.stack(counts)


def realised_density(counts_lg, rows: int) -> float:
  """The fraction of KV groups a probe's `rows` active rows read, averaged over layers: the mean over layers of
  (groups each row selects / G), from the probe's counts `[L, G]` (a dense layer counts every group). With
  adaptive budgets this is the realised density, below the layers' k."""
  counts_lg = np.asarray(counts_lg, np.float64)
  if counts_lg.ndim != 2 or rows < 1:
    raise ValueError(f"realised_density needs counts [L, G] and rows >= 1, got shape {counts_lg.shape}, rows {rows}")
  return float(counts_lg.sum() / (rows * counts_lg.size))
