"""The serving engine's compiled programs: prefill, insert and the multi-step decode round.

All state of the running batch lives on the device in one pytree, `Slots` (`max_batch` rows: the KV cache and, per
row, the last token, whether it is active, tokens made so far, its budget, stop tokens and sampling parameters), so
one compiled program of each kind serves every mix of requests:

  * `prefill_program`: a bucket of prompts `[R, T]` -> last-token logits `[R, V]` and a cache of T slots
    (one program per (R, T) bucket);
  * `first_token_program`: samples a request's first token from its prefill row (one program for all buckets);
  * `insert_program`: copies row r of a prefill into slot s (both traced) with `lax.dynamic_update_slice` on each
    cache leaf (a paged cache: a scatter into the pages of the slot's page-table row) and writes the first token
    and the request's parameters; `Slots` is donated;
  * `table_program`: replaces a paged cache's page table with the host's (after pages were allocated or freed);
  * `chunk_program`: one chunk of a long prompt prefilled straight into its slot (`chunked_prefill`; start, slot
    and valid tokens traced, one program per chunk size); after the last chunk it samples the first token and
    writes the request's parameters as `insert_program` does; `Slots` is donated;
  * `occupy_program`: sets rows active at a context length for the warm-up's cost measurement;
  * `probe_program`: counts the KV groups the sparse step selects for the running rows (`selection_stats`);
  * `step_program()`: up to `steps` decode steps over all slots in one `lax.while_loop`, inactive rows masked (their
    cache length held at `hold_b`), stop tokens and token budgets checked on the device; `Slots` is donated. With
    a paged cache it can step only the rows `rows_r` (a row bucket: their state and page-table rows gathered, the
    page pools shared, the results scattered back), one compiled round per bucket size.

Sampling is per row: temperature, top-k and top-p are `[B]` arrays (never static), greedy rows take the argmax,
and a row's key is `fold_in(key(seed), tokens made so far)`, so a request samples the same tokens whatever else
is in the batch. A request restarted after preemption (its prompt and the tokens it had made prefilled again) passes
`done`, the tokens made before, so its next token is sampled with the index it would have had.

With a paged cache a decode step writes every row's K/V at its length through its page-table row: rows neither
active nor holding a chunked prefill see their table row as the trash page during the step (their pages may have
been freed and handed to another request, or be shared prefix pages), so their writes land nowhere.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax.sharding import NamedSharding, PartitionSpec

from polar_jax import kv_cache, sharding
from polar_jax.kv_cache import KVCache
from polar_jax.paged_kv_cache import PagedKVCache, PagedLayout, masked_table, write_tokens
from polar_jax.sampling import Temperature, TopK, TopP
from polar_jax.serving.chunked_prefill import prefill_chunk
from polar_jax.serving.selection_stats import count_selections

# Times each program has been traced (tests count compilations with it: a traced program is a compiled one).
TRACE_COUNTS = {"prefill": 0, "first": 0, "insert": 0, "chunk": 0, "occupy": 0, "probe": 0, "step": 0, "table": 0}

NO_TOKEN = -1   # `step_program`'s output for a row that made no token in a step


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
  """The running batch on the device (every field has `max_batch` rows).

  Attributes:
    cache: the KV cache (`KVCache` or `PagedKVCache`); a slot's length is its request's tokens so far (0 for a
      free slot).
    tok_b: int32, the last token of each row (the next step's input).
    active_b: bool, rows still generating.
    gen_b: int32, tokens made so far (the first one included).
    max_b: int32, each row's token budget (`max_tokens`).
    stop_bs: int32 `[B, S]`, each row's stop tokens, padded with -1.
    temp_b, topk_b, topp_b: float32 / int32 / float32 sampling parameters (top-k = V and top-p = 1 are off).
    greedy_b: bool, rows that take the argmax.
    seed_b: int32 per-row seeds.
    hold_b: int32, the cache length an inactive row keeps during decode steps: 0, except for a slot whose prompt is
      being prefilled in chunks, where it is the tokens prefilled so far (a decode step writes an inactive row's
      K/V at its length: there the next chunk overwrites it, and the chunks already written stay intact).
  """

  cache: KVCache
  tok_b: jax.Array
  active_b: jax.Array
  gen_b: jax.Array
  max_b: jax.Array
  stop_bs: jax.Array
  temp_b: jax.Array
  topk_b: jax.Array
  topp_b: jax.Array
  greedy_b: jax.Array
  seed_b: jax.Array
  hold_b: jax.Array

  def replace(self, **changes) -> "Slots":
    return dataclasses.replace(self, **changes)


def init_slots(config, batch: int, max_len: int, dtype, stop_width: int, layout: PagedLayout | None = None, *,
               kv_dtype: str | None = None) -> Slots:
  """Every slot free: zero cache and lengths, nothing active. `layout`: a paged cache of that shape, or None for a
  contiguous one of `max_len` slots per row; either stored as `kv_dtype` (`kv_cache.storage_dtype`)."""
  zeros_i = lambda: jnp.zeros((batch,), jnp.int32)   # noqa: E731  (distinct buffers: the state is donated)
  cache = (KVCache.init(config, batch, max_len, dtype, kv_dtype) if layout is None
           else PagedKVCache.init(config, batch, layout, dtype, kv_dtype))
  return Slots(cache=cache, tok_b=zeros_i(), active_b=jnp.zeros((batch,), bool),
               gen_b=zeros_i(), max_b=zeros_i(), stop_bs=jnp.full((batch, stop_width), -1, jnp.int32),
               temp_b=jnp.ones((batch,), jnp.float32), topk_b=jnp.full((batch,), config.vocab_size, jnp.int32),
               topp_b=jnp.ones((batch,), jnp.float32), greedy_b=jnp.ones((batch,), bool), seed_b=zeros_i(),
               hold_b=zeros_i())


def place_slots(slots: Slots, mesh) -> Slots:
  """`slots` on the device, or on `mesh` (the model's tensor-parallel mesh): the KV cache sharded as
  `sharding.cache_spec` (KV groups over "tp"), the per-row state replicated."""
  if mesh is None:
    return jax.device_put(slots)
  cache_sh = NamedSharding(mesh, sharding.cache_spec(slots.cache.batch, sharding.mesh_dp(mesh)))
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = jax.tree_util.tree_map(lambda _: replicated, slots)
  shardings = shardings.replace(cache=KVCache(tuple(cache_sh for _ in slots.cache.k_bhsd),
                                              tuple(cache_sh for _ in slots.cache.v_bhsd), replicated))
  return jax.device_put(slots, shardings)


def sample_rows(logits_bv: jax.Array, temp_b, topk_b, topp_b, greedy_b, seed_b, index_b) -> jax.Array:
  """int32 `[B]`: each row's next token. Greedy rows: the argmax of the float32 logits (as `polar_jax.Greedy`);
  the others: temperature, then top-k, then top-p (`polar_jax.sampling`'s filters with per-row arrays), then a
  categorical draw with the row's own key `fold_in(key(seed_b), index_b)`. The filters run only when some row
  samples."""
  logits = logits_bv.astype(jnp.float32)
  greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sampled(_):
    x = Temperature(jnp.where(greedy_b, 1.0, temp_b)).process(logits)
    x = TopP(topp_b).process(TopK(topk_b).process(x))
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seed_b, index_b)
    return jax.vmap(lambda k, row: jax.random.categorical(k, row).astype(jnp.int32))(keys, x)

  tok = jax.lax.cond(jnp.all(greedy_b), lambda _: greedy_tok, sampled, None)
  return jnp.where(greedy_b, greedy_tok, tok)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def prefill_program(graphdef, state, tokens_rt, lengths_r, *, mesh=None):
  """Dense prefill of R compacted prompts of bucket length T: (logits `[R, V]`, a KV cache of T slots). `mesh`: the
  model's tensor-parallel mesh (the cache is sharded by KV group), or None."""
  TRACE_COUNTS["prefill"] += 1
  with jax.named_scope("serve_prefill"):
    model = nnx.merge(graphdef, state)
    cache = KVCache.init(model.config, tokens_rt.shape[0], tokens_rt.shape[1], model.dtype)
    return model.prefill(tokens_rt, lengths_r, cache, mesh=mesh)


def _first_token(logits_1v, max_tokens, stop_s, temp, topk, topp, greedy, seed, done):
  """(token, active): the token after a request's prompt sampled from its last prompt token's logits (index `done`,
  the tokens it made before: 0 unless restarted), and whether the request goes on after it."""
  one = lambda x, dtype: jnp.asarray(x, dtype)[None]   # noqa: E731
  first = sample_rows(logits_1v, one(temp, jnp.float32), one(topk, jnp.int32), one(topp, jnp.float32),
                      one(greedy, bool), one(seed, jnp.int32), one(done, jnp.int32))[0]
  return first, ~jnp.any(first == stop_s) & (done + 1 < max_tokens)


@jax.jit
def first_token_program(logits_rv, row, max_tokens, stop_s, temp, topk, topp, greedy, seed, done):
  """The first token of row `row` of a prefill (sampled with index `done`) and whether the request goes on: (token,
  active). One program for every prefill bucket (the logits are `[R, V]`)."""
  TRACE_COUNTS["first"] += 1
  logits_1v = jax.lax.dynamic_slice_in_dim(logits_rv, row, 1, axis=0)
  return _first_token(logits_1v, max_tokens, stop_s, temp, topk, topp, greedy, seed, done)


def _start_request(slots: Slots, cache, slot, first, active, max_tokens, stop_s, temp, topk, topp, greedy,
                   seed, done) -> Slots:
  """`slots` with `cache` and slot `slot` running a request from its first token (its hold length back to 0)."""
  return slots.replace(
      cache=cache, tok_b=slots.tok_b.at[slot].set(first), active_b=slots.active_b.at[slot].set(active),
      gen_b=slots.gen_b.at[slot].set(done + 1), max_b=slots.max_b.at[slot].set(max_tokens),
      stop_bs=slots.stop_bs.at[slot].set(stop_s), temp_b=slots.temp_b.at[slot].set(temp),
      topk_b=slots.topk_b.at[slot].set(topk), topp_b=slots.topp_b.at[slot].set(topp),
      greedy_b=slots.greedy_b.at[slot].set(greedy), seed_b=slots.seed_b.at[slot].set(seed),
      hold_b=slots.hold_b.at[slot].set(0))


def _insert_rows(cache, prefill: KVCache, row, slot):
  """`cache` with row `row` of a prefill as slot `slot`: copied into the slot's row (contiguous) or scattered into
  the pages of its page-table row (paged), and the slot's length set."""
  n = prefill.lengths_b[row]
  if isinstance(cache, PagedKVCache):
    table_p = cache.page_table_bp[slot]
    put = lambda dst, src: write_tokens(dst, jax.lax.dynamic_index_in_dim(src, row, 0, keepdims=False),  # noqa
                                        table_p, 0, n)
  else:
    def put(dst_bhsd, src_rhtd):   # quantised into an 8-bit cache
      row_1htd = jax.lax.dynamic_slice_in_dim(src_rhtd, row, 1, axis=0)
      return kv_cache.update_slice(dst_bhsd, row_1htd, (slot, 0, 0, 0))
  layers = [cache.layer_kv(i) for i in range(len(prefill.k_bhsd))]
  ks = [put(k, src) for (k, _), src in zip(layers, prefill.k_bhsd)]
  vs = [put(v, src) for (_, v), src in zip(layers, prefill.v_bhsd)]
  return cache.with_layers(ks, vs, cache.lengths_b.at[slot].set(n))


@functools.partial(jax.jit, donate_argnames=("slots",))
def insert_program(slots: Slots, prefill: KVCache, row, slot, first, active, max_tokens, stop_s, temp, topk, topp,
                   greedy, seed, done) -> Slots:
  """Row `row` of a prefill into slot `slot` (both traced scalars): its cache rows and length, its first token and
  its parameters."""
  TRACE_COUNTS["insert"] += 1
  with jax.named_scope("serve_insert"):
    cache = _insert_rows(slots.cache, prefill, row, slot)
    return _start_request(slots, cache, slot, first, active, max_tokens, stop_s, temp, topk, topp, greedy, seed,
                          done)


@functools.partial(jax.jit, donate_argnames=("slots",))
def table_program(slots: Slots, page_table_bp) -> Slots:
  """`slots` with the paged cache's page table replaced by `page_table_bp` (the host's)."""
  TRACE_COUNTS["table"] += 1
  return slots.replace(cache=dataclasses.replace(slots.cache, page_table_bp=page_table_bp))


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "key_span"), donate_argnames=("slots",))
def chunk_program(graphdef, state, slots: Slots, tokens_c, start, prompt_len, slot, max_tokens, stop_s, temp, topk,
                  topp, greedy, seed, done, *, mesh=None, key_span=None):
  """Prefills prompt tokens `[start, min(start + C, prompt_len))` (`tokens_c`, padded to C) into slot `slot`
  (`chunked_prefill.prefill_chunk`, attending over the slot's keys `[0, key_span)`). Until the prompt's last chunk
  the slot stays inactive with its hold length at the tokens prefilled; the last chunk samples the first token and
  starts the request as `insert_program` does. Returns (slots, first token, active); the token means something
  only after the last chunk."""
  TRACE_COUNTS["chunk"] += 1
  with jax.named_scope("serve_prefill_chunk"):
    model = nnx.merge(graphdef, state)
    n_valid = jnp.minimum(prompt_len - start, tokens_c.shape[0])
    logits_v, cache = prefill_chunk(model, tokens_c, start, n_valid, slots.cache, slot, mesh=mesh, key_span=key_span)
    end = start + n_valid
    last = end >= prompt_len
    first, active = _first_token(logits_v[None], max_tokens, stop_s, temp, topk, topp, greedy, seed, done)
    cache = dataclasses.replace(cache, lengths_b=cache.lengths_b.at[slot].set(end))
    started = _start_request(slots, cache, slot, first, active & last, max_tokens, stop_s, temp, topk, topp, greedy,
                             seed, done)
    return started.replace(hold_b=started.hold_b.at[slot].set(jnp.where(last, 0, end))), first, active & last


@functools.partial(jax.jit, donate_argnames=("slots",))
def occupy_program(slots: Slots, rows, context) -> Slots:
  """`slots` as a cost measurement sets them: rows `[0, rows)` active with `context` cached tokens (whatever K/V
  the cache holds; a paged cache's rows spread over the pool's pages), greedy, no stop token and no budget limit;
  the other rows free. `rows` = 0 frees every row (the engine then restores its page table)."""
  TRACE_COUNTS["occupy"] += 1
  b = slots.active_b.shape[0]
  on = jnp.arange(b) < rows
  cache = dataclasses.replace(slots.cache, lengths_b=jnp.where(on, context, 0).astype(jnp.int32))
  if isinstance(cache, PagedKVCache):
    p = cache.page_table_bp.shape[1]
    spread_bp = (jnp.arange(b)[:, None] * p + jnp.arange(p)[None, :]) % cache.trash_page
    cache = dataclasses.replace(cache, page_table_bp=spread_bp.astype(jnp.int32))
  return slots.replace(cache=cache, tok_b=jnp.zeros_like(slots.tok_b), active_b=on, gen_b=jnp.ones_like(slots.gen_b),
                       max_b=jnp.full_like(slots.max_b, 2**30), stop_bs=jnp.full_like(slots.stop_bs, -1),
                       greedy_b=jnp.ones_like(slots.greedy_b), hold_b=jnp.zeros_like(slots.hold_b))


@functools.partial(jax.jit, static_argnames=("graphdef", "decode"), donate_argnames=("slots",))
def probe_program(graphdef, state, slots: Slots, decode_state, *, decode):
  """(slots, int32 `[L, G]` active rows selecting each KV group in the next sparse step, active rows); the slots
  mean the same afterwards (`selection_stats.count_selections`)."""
  TRACE_COUNTS["probe"] += 1
  with jax.named_scope("serve_selection_probe"):
    model = nnx.merge(graphdef, state)
    view = _writable_view(slots.cache, slots.active_b | (slots.hold_b > 0))
    cache, counts_lg = count_selections(model, decode, decode_state, slots.tok_b, view, slots.active_b)
    rows = jnp.sum(slots.active_b.astype(jnp.int32))
    return slots.replace(cache=_with_table_of(cache, slots.cache)), counts_lg, rows


def _writable_view(cache, keep_b):
  """The cache a decode step runs on: a paged cache's rows outside `keep_b` write to the trash page."""
  return masked_table(cache, keep_b) if isinstance(cache, PagedKVCache) else cache


def _with_table_of(cache, like):
  """`cache` with `like`'s page table back (undoes `_writable_view`)."""
  return dataclasses.replace(cache, page_table_bp=like.page_table_bp) if isinstance(cache, PagedKVCache) else cache


def gather_rows(slots: Slots, rows_r: jax.Array) -> Slots:
  """Rows `rows_r` of `slots` as a batch of their own: the per-row state and page-table rows gathered, the paged
  cache's page pools shared (not copied)."""
  cache = dataclasses.replace(slots.cache, page_table_bp=slots.cache.page_table_bp[rows_r],
                              lengths_b=slots.cache.lengths_b[rows_r])
  return Slots(cache=cache, **{name: getattr(slots, name)[rows_r] for name in _ROW_FIELDS})


def scatter_rows(slots: Slots, sub: Slots, rows_r: jax.Array) -> Slots:
  """`slots` with rows `rows_r` (distinct) replaced by `sub` (`gather_rows` undone) and the pools of `sub`'s cache."""
  cache = dataclasses.replace(sub.cache, page_table_bp=slots.cache.page_table_bp,
                              lengths_b=slots.cache.lengths_b.at[rows_r].set(sub.cache.lengths_b))
  return Slots(cache=cache, **{name: getattr(slots, name).at[rows_r].set(getattr(sub, name))
                               for name in _ROW_FIELDS})


_ROW_FIELDS = tuple(f.name for f in dataclasses.fields(Slots) if f.name != "cache")


def _step(graphdef, state, slots: Slots, decode_state, cancel_b, rows_r=None, *, decode, steps: int):
  TRACE_COUNTS["step"] += 1
  with jax.named_scope("serve_step"):
    model = nnx.merge(graphdef, state)
    active = slots.active_b & ~cancel_b
    hold = jnp.where(cancel_b, 0, slots.hold_b)   # a cancelled chunked prefill frees its slot
    cache = slots.cache
    cache = dataclasses.replace(cache, lengths_b=jnp.where(active, cache.lengths_b, hold))
    slots = slots.replace(active_b=active, cache=cache, hold_b=hold)
    every = slots
    if rows_r is not None:   # a row bucket: only these rows step (the others are inactive or wait)
      slots = gather_rows(slots, rows_r)
    out = jnp.full((slots.active_b.shape[0], steps), NO_TOKEN, jnp.int32)

    def cond(carry):
      i, s, _ = carry
      return (i < steps) & jnp.any(s.active_b)

    def body(carry):
      i, s, out = carry
      act = s.active_b
      view = _writable_view(s.cache, act | (s.hold_b > 0))
      logits, cache = decode(model, s.tok_b, view, decode_state, act)
      cache = _with_table_of(cache, s.cache)
      new = sample_rows(logits, s.temp_b, s.topk_b, s.topp_b, s.greedy_b, s.seed_b, s.gen_b)
      new = jnp.where(act, new, NO_TOKEN)
      out = jax.lax.dynamic_update_slice(out, new[:, None], (0, i))
      gen = s.gen_b + act.astype(jnp.int32)
      done = act & (jnp.any(new[:, None] == s.stop_bs, axis=1) | (gen >= s.max_b))
      still = act & ~done
      cache = dataclasses.replace(cache, lengths_b=jnp.where(still, cache.lengths_b, s.hold_b))
      s = s.replace(cache=cache, tok_b=jnp.where(act, new, s.tok_b), active_b=still, gen_b=gen)
      return i + 1, s, out

    n, slots, out = jax.lax.while_loop(cond, body, (jnp.int32(0), slots, out))
    if rows_r is not None:
      out = jnp.full((every.active_b.shape[0], steps), NO_TOKEN, jnp.int32).at[rows_r].set(out)
      slots = scatter_rows(every, slots, rows_r)
    # the rows still active, as their own buffer (the host reads it after `slots` was donated to the next program)
    return slots, out, n, slots.active_b.astype(jnp.int8)


_STEP_PROGRAMS: dict[tuple, Any] = {}


def step_program(loop_options: dict[str, Any] | None = None):
  """The jitted round of decode steps (`Slots` donated; `graphdef`, `decode` and `steps` static), one per distinct
  `loop_options` (XLA compiler options for the loop: `polar_jax.compile_options.decode_loop_options`, on GPU the
  whole loop as one CUDA graph), shared by every engine of the process."""
  key = tuple(sorted((loop_options or {}).items()))
  if key not in _STEP_PROGRAMS:
    _STEP_PROGRAMS[key] = jax.jit(_step, static_argnames=("graphdef", "decode", "steps"),
                                  donate_argnames=("slots",), compiler_options=loop_options or None)
  return _STEP_PROGRAMS[key]
