"""One chunk of a long prompt's prefill, written straight into one row (slot) of a batch's KV cache.

A chunk is C consecutive prompt tokens at positions `[start, start + C)` (the last chunk of a prompt is padded to
C). Each layer projects the chunk's q/k/v, writes its K/V into the slot's cache row at those positions, then runs
causal attention of the chunk's queries over the row's keys `[0, start + C)`: the earlier chunks' keys and the
chunk's own. This is the computation `CausalLM.prefill` does for the whole prompt, split along the query axis, so
a prompt prefilled chunk by chunk leaves the same cache and the same last-token logits (up to float rounding).

With a `PagedKVCache` the chunk's valid tokens are written into the slot's pages (its page-table row) and the
chunk attends over the row's pages gathered in order; the first chunk may start past a cached prefix (pages
already holding the prompt's first tokens), so only the rest of the prompt is computed.

`start`, the number of valid tokens and the slot are traced. `key_span` (static) bounds the keys a chunk reads:
the attention runs over keys `[0, key_span)` only (the caller picks a span >= start + valid tokens, e.g. the
smallest of a few buckets, `serving.scheduler.chunk_spans`), so the early chunks of a prompt do not pay for the
whole row's `max_len` keys; one compiled program per (chunk size, span) serves every chunk of every prompt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from polar_jax import kv_cache, sharding
from polar_jax.kv_cache import KVCache
from polar_jax.paged_kv_cache import PagedKVCache, gather_row, write_tokens

_MASKED = -1e30   # finite, as in `polar_jax.attention.prefill_attention`
SCORE_BUDGET = 1 << 28   # float32 score elements per query block, as `prefill_attention` bounds its own


def chunk_attention(q_chd: jax.Array, k_hsd: jax.Array, v_hsd: jax.Array, start, *, scale: float,
                    window: int | None = None, score_budget: int = SCORE_BUDGET) -> jax.Array:
  """Causal attention of C queries at positions `start + [0, C)` over one row's keys `[Hkv, S, D]`: query c sees
  keys s <= start + c (and s > start + c - window with a sliding window). Returns `[C, Hq, D]` in q's dtype.
  Queries go a block at a time so that the float32 scores stay within `score_budget` elements."""
  c, hq, d = q_chd.shape
  hkv, s = k_hsd.shape[:2]
  q = q_chd.reshape(c, hkv, hq // hkv, d)
  key_pos = jnp.arange(s)
  block = max(1, min(c, score_budget // max(1, hq * s)))
  outs = []
  for b0 in range(0, c, block):
    qb = q[b0:b0 + block]
    scores = jnp.einsum("cgrd,gsd->grcs", qb, k_hsd, preferred_element_type=jnp.float32) * scale
    q_pos = start + b0 + jnp.arange(qb.shape[0])
    mask = key_pos[None, :] <= q_pos[:, None]
    if window is not None:
      mask = mask & (key_pos[None, :] > q_pos[:, None] - window)
    probs = jax.nn.softmax(jnp.where(mask, scores, _MASKED), axis=-1)
    outs.append(jnp.einsum("grcs,gsd->cgrd", probs.astype(v_hsd.dtype), v_hsd, preferred_element_type=jnp.float32))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
  return out.astype(q_chd.dtype).reshape(c, hq, d)


def write_chunk(cache_bhsd, new_chd: jax.Array, slot, start):
  """Writes a chunk's K or V `[C, Hkv, D]` into row `slot`, positions `[start, start + C)` (quantised into an 8-bit
  `kv_cache.QuantizedKV`); positions past the cache's end (a padded last chunk) are dropped."""
  c, hkv, _ = new_chd.shape
  index = (slot, jnp.arange(hkv)[:, None], (start + jnp.arange(c))[None, :])
  return kv_cache.scatter_set(cache_bhsd, index, new_chd.transpose(1, 0, 2), mode="drop")


def _write_contiguous(k_cache_bhsd, v_cache_bhsd, k_chd, v_chd, slot, start, mesh, key_span):
  """Writes the chunk into row `slot`; returns (caches, the row's first `key_span` keys and values `[Hkv, span, D]`
  in the chunk's dtype: dequantised from an 8-bit cache)."""
  k_cache_bhsd = write_chunk(k_cache_bhsd, k_chd, slot, start)
  v_cache_bhsd = write_chunk(v_cache_bhsd, v_chd, slot, start)
  if mesh is not None:
    k_cache_bhsd = sharding.constrain_cache(k_cache_bhsd, mesh)
    v_cache_bhsd = sharding.constrain_cache(v_cache_bhsd, mesh)
  row = lambda cache: kv_cache.read(jax.tree_util.tree_map(   # noqa: E731
      lambda x: jax.lax.dynamic_index_in_dim(x, slot, 0, keepdims=False)[:, :key_span], cache), k_chd.dtype)
  return k_cache_bhsd, v_cache_bhsd, row(k_cache_bhsd), row(v_cache_bhsd)


def _write_paged(k_pages_hpsd, v_pages_hpsd, k_chd, v_chd, table_p, start, n_valid, key_span):
  """Writes the chunk's valid tokens into the row's pages `table_p`; returns (pools, the row's first `key_span` keys
  and values, gathered from the pages that hold them)."""
  k_pages_hpsd = write_tokens(k_pages_hpsd, k_chd.transpose(1, 0, 2), table_p, start, n_valid)
  v_pages_hpsd = write_tokens(v_pages_hpsd, v_chd.transpose(1, 0, 2), table_p, start, n_valid)
  span_p = table_p[:-(-key_span // k_pages_hpsd.shape[2])]
  row = lambda pages: gather_row(pages, span_p, k_chd.dtype)[:, :key_span]   # noqa: E731
  return k_pages_hpsd, v_pages_hpsd, row(k_pages_hpsd), row(v_pages_hpsd)


def _layer_chunk(layer, h_1cd, start, slot, k_cache, v_cache, mesh, table_p, n_valid, key_span):
  attn = layer.attn
  c = h_1cd.shape[1]
  x = layer.attn_norm(h_1cd) if layer.pre_norm else h_1cd
  q, k, v = attn._qkv(x, (start + jnp.arange(c))[None, :])   # pylint: disable=protected-access
  if table_p is None:
    k_cache, v_cache, k_row, v_row = _write_contiguous(k_cache, v_cache, k[0], v[0], slot, start, mesh, key_span)
  else:
    k_cache, v_cache, k_row, v_row = _write_paged(k_cache, v_cache, k[0], v[0], table_p, start, n_valid, key_span)
  ctx = chunk_attention(q[0], k_row, v_row, start, scale=attn.scale, window=attn.window)
  a = attn.o_proj(ctx.reshape(1, c, -1))
  h = h_1cd + a if layer.pre_norm else layer.attn_norm(h_1cd + a)
  return layer._mlp_block(h, layer.mlp), k_cache, v_cache   # pylint: disable=protected-access


def prefill_chunk(model, tokens_c: jax.Array, start, n_valid, cache: KVCache | PagedKVCache, slot, *, mesh=None,
                  key_span: int | None = None) -> tuple[jax.Array, KVCache | PagedKVCache]:
  """Prefills `n_valid` (<= C) prompt tokens `tokens_c[:n_valid]` at positions `[start, start + n_valid)` into row
  `slot` of `cache`, attending over the row's keys `[0, key_span)` (None: all `max_len`; the caller keeps
  start + n_valid <= key_span). Returns (float32 logits `[V]` of the chunk's last valid token, the cache with the
  chunk's K/V written; its lengths unchanged: the caller decides the row's length)."""
  c = tokens_c.shape[0]
  key_span = cache.max_len if key_span is None else key_span
  if not 0 < key_span <= cache.max_len:
    raise ValueError(f"key_span must be in [1, {cache.max_len}] (the cache's tokens per row), got {key_span}")
  h = model.embed_tokens(tokens_c[None, :], (start + jnp.arange(c))[None, :])
  table_p = cache.page_table_bp[slot] if isinstance(cache, PagedKVCache) else None
  ks, vs = [], []
  for i, layer in enumerate(model.layers):
    h, k, v = _layer_chunk(layer, h, start, slot, *cache.layer_kv(i), mesh, table_p, n_valid, key_span)
    ks.append(k)
    vs.append(v)
  last_d = jax.lax.dynamic_index_in_dim(h[0], n_valid - 1, 0, keepdims=False)
  return model.logits(last_d[None])[0], cache.with_layers(ks, vs, cache.lengths_b)
