"""The serving engine's compiled programs: prefill, insert and the multi-step decode round.

All state of the running batch lives on the device in one pytree, `Slots` (`max_batch` rows: the KV cache and, per
row, the last token, whether it is active, tokens made so far, its budget, stop tokens and sampling parameters), so
one compiled program of each kind serves every mix of requests:

  * `prefill_program`: a bucket of prompts `[R, T]` -> last-token logits `[R, V]` and a cache of T slots
    (one program per (R, T) bucket);
  * `first_token_program`: samples a request's first token from its prefill row (one program for all buckets);
  * `insert_program`: copies row r of a prefill into slot s (both traced) with `lax.dynamic_update_slice` on each
    cache leaf and writes the first token and the request's parameters; `Slots` is donated;
  * `step_program()`: up to `steps` decode steps over all slots in one `lax.while_loop`, inactive rows masked (their
    cache length held at 0), stop tokens and token budgets checked on the device; `Slots` is donated.

Sampling is per row: temperature, top-k and top-p are `[B]` arrays (never static), greedy rows take the argmax,
and a row's key is `fold_in(key(seed), tokens made so far)`, so a request samples the same tokens whatever else
is in the batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from polar_jax.kv_cache import KVCache
from polar_jax.sampling import Temperature, TopK, TopP

# Times each program has been traced (tests count compilations with it: a traced program is a compiled one).
TRACE_COUNTS = {"prefill": 0, "first": 0, "insert": 0, "step": 0}

NO_TOKEN = -1   # `step_program`'s output for a row that made no token in a step


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
  """The running batch on the device (every field has `max_batch` rows).

  Attributes:
    cache: the KV cache; a slot's length is its request's tokens so far (0 for a free slot).
    tok_b: int32, the last token of each row (the next step's input).
    active_b: bool, rows still generating.
    gen_b: int32, tokens made so far (the first one included).
    max_b: int32, each row's token budget (`max_tokens`).
    stop_bs: int32 `[B, S]`, each row's stop tokens, padded with -1.
    temp_b, topk_b, topp_b: float32 / int32 / float32 sampling parameters (top-k = V and top-p = 1 are off).
    greedy_b: bool, rows that take the argmax.
    seed_b: int32 per-row seeds.
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

  def replace(self, **changes) -> "Slots":
    return dataclasses.replace(self, **changes)


def init_slots(config, batch: int, max_len: int, dtype, stop_width: int) -> Slots:
  """Every slot free: zero cache and lengths, nothing active."""
  zeros_i = lambda: jnp.zeros((batch,), jnp.int32)   # noqa: E731  (distinct buffers: the state is donated)
  return Slots(cache=KVCache.init(config, batch, max_len, dtype), tok_b=zeros_i(), active_b=jnp.zeros((batch,), bool),
               gen_b=zeros_i(), max_b=zeros_i(), stop_bs=jnp.full((batch, stop_width), -1, jnp.int32),
               temp_b=jnp.ones((batch,), jnp.float32), topk_b=jnp.full((batch,), config.vocab_size, jnp.int32),
               topp_b=jnp.ones((batch,), jnp.float32), greedy_b=jnp.ones((batch,), bool), seed_b=zeros_i())


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


@functools.partial(jax.jit, static_argnames=("graphdef",))
def prefill_program(graphdef, state, tokens_rt, lengths_r):
  """Dense prefill of R compacted prompts of bucket length T: (logits `[R, V]`, a KV cache of T slots)."""
  TRACE_COUNTS["prefill"] += 1
  with jax.named_scope("serve_prefill"):
    model = nnx.merge(graphdef, state)
    cache = KVCache.init(model.config, tokens_rt.shape[0], tokens_rt.shape[1], model.dtype)
    return model.prefill(tokens_rt, lengths_r, cache)


@jax.jit
def first_token_program(logits_rv, row, max_tokens, stop_s, temp, topk, topp, greedy, seed):
  """The first token of row `row` of a prefill (sampled with index 0) and whether the request goes on: (token,
  active). One program for every prefill bucket (the logits are `[R, V]`)."""
  TRACE_COUNTS["first"] += 1
  logits_1v = jax.lax.dynamic_slice_in_dim(logits_rv, row, 1, axis=0)
  one = lambda x, dtype: jnp.asarray(x, dtype)[None]   # noqa: E731
  first = sample_rows(logits_1v, one(temp, jnp.float32), one(topk, jnp.int32), one(topp, jnp.float32),
                      one(greedy, bool), one(seed, jnp.int32), jnp.zeros((1,), jnp.int32))[0]
  return first, ~jnp.any(first == stop_s) & (max_tokens > 1)


@functools.partial(jax.jit, donate_argnames=("slots",))
def insert_program(slots: Slots, prefill: KVCache, row, slot, first, active, max_tokens, stop_s, temp, topk, topp,
                   greedy, seed) -> Slots:
  """Row `row` of a prefill into slot `slot` (both traced scalars): its cache rows and length, its first token and
  its parameters."""
  TRACE_COUNTS["insert"] += 1
  with jax.named_scope("serve_insert"):
    def put(dst_bhsd, src_rhtd):
      row_1htd = jax.lax.dynamic_slice_in_dim(src_rhtd, row, 1, axis=0)
      return jax.lax.dynamic_update_slice(dst_bhsd, row_1htd.astype(dst_bhsd.dtype), (slot, 0, 0, 0))

    cache = slots.cache
    cache = KVCache(tuple(put(d, s) for d, s in zip(cache.k_bhsd, prefill.k_bhsd)),
                    tuple(put(d, s) for d, s in zip(cache.v_bhsd, prefill.v_bhsd)),
                    cache.lengths_b.at[slot].set(prefill.lengths_b[row]))
    return slots.replace(
        cache=cache, tok_b=slots.tok_b.at[slot].set(first), active_b=slots.active_b.at[slot].set(active),
        gen_b=slots.gen_b.at[slot].set(1), max_b=slots.max_b.at[slot].set(max_tokens),
        stop_bs=slots.stop_bs.at[slot].set(stop_s), temp_b=slots.temp_b.at[slot].set(temp),
        topk_b=slots.topk_b.at[slot].set(topk), topp_b=slots.topp_b.at[slot].set(topp),
        greedy_b=slots.greedy_b.at[slot].set(greedy), seed_b=slots.seed_b.at[slot].set(seed))


def _step(graphdef, state, slots: Slots, decode_state, cancel_b, *, decode, steps: int):
  TRACE_COUNTS["step"] += 1
  with jax.named_scope("serve_step"):
    model = nnx.merge(graphdef, state)
    active = slots.active_b & ~cancel_b
    cache = slots.cache
    cache = KVCache(cache.k_bhsd, cache.v_bhsd, jnp.where(active, cache.lengths_b, 0))
    slots = slots.replace(active_b=active, cache=cache)
    out = jnp.full((active.shape[0], steps), NO_TOKEN, jnp.int32)

    def cond(carry):
      i, s, _ = carry
      return (i < steps) & jnp.any(s.active_b)

    def body(carry):
      i, s, out = carry
      act = s.active_b
      logits, cache = decode(model, s.tok_b, s.cache, decode_state, act)
      new = sample_rows(logits, s.temp_b, s.topk_b, s.topp_b, s.greedy_b, s.seed_b, s.gen_b)
      new = jnp.where(act, new, NO_TOKEN)
      out = jax.lax.dynamic_update_slice(out, new[:, None], (0, i))
      gen = s.gen_b + act.astype(jnp.int32)
      done = act & (jnp.any(new[:, None] == s.stop_bs, axis=1) | (gen >= s.max_b))
      still = act & ~done
      cache = KVCache(cache.k_bhsd, cache.v_bhsd, jnp.where(still, cache.lengths_b, 0))
      s = s.replace(cache=cache, tok_b=jnp.where(act, new, s.tok_b), active_b=still, gen_b=gen)
      return i + 1, s, out

    n, slots, out = jax.lax.while_loop(cond, body, (jnp.int32(0), slots, out))
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
