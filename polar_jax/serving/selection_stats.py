"""Which KV groups the sparse decode step selects: a probe the engine runs every few sparse rounds.

The probe runs one sparse decode step's layers from the running batch's state (`SparseDecode.plans`, then each
layer's `decode` with the selection resolved to group indices) and counts, per layer and KV group, the active rows
that select it. It writes the new token's K/V at each row's length, which the next real step writes with the same
values, and leaves the lengths and every other field alone, so the batch's state means the same afterwards.
Selectors "router" and "random" are probed; the oracle (dense attention, then a top-k by output norm) is not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from polar_jax.kv_cache import KVCache
from polar_jax.selection import DenseHeads, GroupIndices, LayerPlan, LinearRouter


def probes(decode) -> bool:
  """Whether `decode` (a decode-step object) makes selections the probe can count."""
  return getattr(decode, "selector", None) in ("router", "random") and hasattr(decode, "plans")


def _selected_bk(layer, plan: LayerPlan, h_bd, num_groups: int) -> jax.Array:
  """int32 `[B, K]` group indices a layer's plan selects (every group for a dense layer)."""
  heads = plan.heads
  if isinstance(heads, GroupIndices):
    return heads.idx_bk
  if isinstance(heads, LinearRouter):
    x_bd = layer.attn_norm(h_bd) if layer.pre_norm else h_bd
    return heads.select(x_bd)
  if isinstance(heads, DenseHeads):
    return jnp.broadcast_to(jnp.arange(num_groups, dtype=jnp.int32), (h_bd.shape[0], num_groups))
  raise TypeError(f"the selection probe cannot count {type(heads).__name__} selections")


def count_selections(model, decode, decode_state, tok_b, cache: KVCache, active_b) -> tuple[KVCache, jax.Array]:
  """(cache with the step's K/V written at each row's length, int32 `[L, G]` active rows selecting each group)."""
  num_groups = model.config.num_kv_heads
  plans = decode.plans(model, tok_b, cache.lengths_b, decode_state, active_b)
  h = model.embed_tokens(tok_b, cache.lengths_b)
  ks, vs, counts = [], [], []
  for i, layer in enumerate(model.layers):
    idx_bk = _selected_bk(layer, plans[i], h, num_groups)
    hits_bg = jnp.zeros((idx_bk.shape[0], num_groups), jnp.int32).at[jnp.arange(idx_bk.shape[0])[:, None],
                                                                       idx_bk].set(1)
    counts.append(jnp.sum(hits_bg * active_b[:, None].astype(jnp.int32), axis=0))
    plan = LayerPlan(GroupIndices(idx_bk) if not isinstance(plans[i].heads, DenseHeads) else plans[i].heads,
                     plans[i].neurons)
    out = layer.decode(h, cache.lengths_b, cache.k_bhsd[i], cache.v_bhsd[i], plan, options=decode.options,
                       mesh=decode.mesh)
    h = out.h
    ks.append(out.k_cache_bhsd)
    vs.append(out.v_cache_bhsd)
  return KVCache(tuple(ks), tuple(vs), cache.lengths_b), jnp.stack(counts)
