"""Batched generation: dense prefill plus a `lax.while_loop` decode, one jitted program.

Prompts may be ragged (a list of token lists) or padded arrays with an attention mask (left or
right padding). They are compacted on the host, padded up to a length bucket and a batch bucket,
so calls with the same buckets and `max_new_tokens` reuse one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from polar_jax.compile_options import jit_loop
from polar_jax.kv_cache import KVCache
from polar_jax.model import CausalLM
from polar_jax.options import DecodeOptions, check_options
from polar_jax.sampling import Greedy, Sampler
from polar_jax.sharding import to_host
from polar_jax.sparse_decode import DenseDecode, make_decoder

__all__ = ["DenseDecode", "GenerationOutput", "generate", "stream"]

# Number of times the generate program has been traced (tests use it to count compilations).
TRACE_COUNTS = {"generate": 0, "prefill": 0, "step": 0}


class GenerationOutput(NamedTuple):
  """tokens `[B, max_new_tokens]` (int32, padded with `pad_token_id` after a row stops) and
  lengths `[B]`: tokens generated per row, the stop token included."""

  tokens: np.ndarray
  lengths: np.ndarray


@dataclasses.dataclass(frozen=True)
class PreparedBatch:
  """Host-side compacted, bucketed prompts."""

  tokens_bt: np.ndarray     # [Bp, Tp] valid tokens first, zero padded
  lengths_b: np.ndarray     # [Bp] int32
  batch: int                # real rows (the first `batch` of Bp)
  max_len: int              # cache length = Tp + max_new_tokens


def length_bucket(n: int) -> int:
  """Prompt-length bucket: 16, 32, ..., 1024, then multiples of 512."""
  if n <= 16:
    return 16
  if n <= 1024:
    return 1 << (n - 1).bit_length()
  return -(-n // 512) * 512


def batch_bucket(n: int) -> int:
  """Batch bucket: 1, 2, 4, 8, 16, 24, 32, 48, 64, then multiples of 32."""
  for b in (1, 2, 4, 8, 16, 24, 32, 48, 64):
    if n <= b:
      return b
  return -(-n // 32) * 32


def prepare_batch(input_ids, attention_mask, *, vocab_size: int, context: int,
                  max_new_tokens: int) -> PreparedBatch:
  """Validates and compacts prompts. Raises ValueError naming the problem."""
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
  rows = _rows(input_ids, attention_mask)
  if not rows:
    raise ValueError("empty batch: no prompts given")
  for i, r in enumerate(rows):
    if len(r) == 0:
      raise ValueError(f"prompt {i} is empty (no tokens under the attention mask)")
    bad = r[(r < 0) | (r >= vocab_size)]
    if bad.size:
      raise ValueError(f"prompt {i} has token ids out of the vocabulary [0, {vocab_size}): {bad[:5].tolist()}")
  longest = max(len(r) for r in rows)
  if longest > context:
    raise ValueError(f"prompt of {longest} tokens is longer than the model's context ({context})")
  if longest + max_new_tokens > context:
    raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                     f"context ({context})")
  t = min(length_bucket(longest), context)
  bp = batch_bucket(len(rows))
  tokens = np.zeros((bp, t), np.int32)
  lengths = np.ones((bp,), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
    lengths[i] = len(r)
  return PreparedBatch(tokens, lengths, len(rows), t + max_new_tokens)


def _rows(input_ids, attention_mask) -> list[np.ndarray]:
  if isinstance(input_ids, (list, tuple)) and input_ids and not np.isscalar(input_ids[0]) and attention_mask is None:
    return [np.asarray(r, np.int64).reshape(-1) for r in input_ids]
  ids = np.asarray(input_ids)
  if ids.size == 0:
    return []
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, seq] or a list of token lists, got shape {ids.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"input_ids must be integers, got {ids.dtype}")
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
  return [ids[i][mask[i].astype(bool)].astype(np.int64) for i in range(ids.shape[0])]


def _pad_token(model: CausalLM, stop_tokens: Sequence[int]) -> int:
  cfg = model.config
  if cfg.pad_token_id is not None:
    return int(cfg.pad_token_id)
  return int(stop_tokens[0]) if stop_tokens else 0


# ---- the jitted program ---------------------------------------------------------------------
def _sample(sampler, logits, key):
  return sampler(logits, key)


@functools.partial(jit_loop, static_argnames=("graphdef", "max_new_tokens", "max_len", "stop_tokens",
                                              "pad_id", "decode"))
def _generate_program(graphdef, state, tokens_bt, lengths_b, real_b, sampler, key, decode_state, *,
                      max_new_tokens, max_len, stop_tokens, pad_id, decode):
  TRACE_COUNTS["generate"] += 1
  model = nnx.merge(graphdef, state)
  b = tokens_bt.shape[0]
  cache = KVCache.init(model.config, b, max_len, model.dtype, decode.options.kv_dtype)
  logits, cache = model.prefill(tokens_bt, lengths_b, cache, mesh=decode.mesh)
  stop = jnp.asarray(stop_tokens or (-1,), jnp.int32)
  key, sub = jax.random.split(key)
  tok = _sample(sampler, logits, sub)
  done = jnp.isin(tok, stop) | ~real_b           # bucket-padding rows start done
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
  gen = jnp.ones((b,), jnp.int32)

  def cond(carry):
    step, _, done, *_ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, tok, done, out, gen, cache, key = carry
    logits, cache = decode(model, tok, cache, decode_state, ~done)
    key, sub = jax.random.split(key)
    new = _sample(sampler, logits, sub)
    new = jnp.where(done, pad_id, new)
    out = jax.lax.dynamic_update_slice(out, new[:, None], (0, step))
    gen = jnp.where(done, gen, gen + 1)
    done = done | jnp.isin(new, stop)
    return step + 1, new, done, out, gen, cache, key

  carry = (jnp.int32(1), tok, done, out, gen, cache, key)
  _, _, _, out, gen, _, _ = jax.lax.while_loop(cond, body, carry)
  return out, gen


def _real_rows(batch: PreparedBatch) -> np.ndarray:
  """bool `[Bp]`: True for the prompts' rows, False for batch-bucket padding."""
  return np.arange(batch.tokens_bt.shape[0]) < batch.batch


def _check_sampler(sampler):
  if not isinstance(sampler, Sampler):
    raise TypeError(f"sampler must be a polar_jax Sampler (Greedy, Temperature, TopK, TopP), got {sampler!r}")
  sampler.validate()


def generate(model: CausalLM, input_ids, attention_mask=None, *, max_new_tokens: int,
             sampler: Sampler = Greedy(), stop_tokens: Sequence[int] = (), seed: int = 0,
             sparsity=None, routers=None, options: DecodeOptions | None = None) -> GenerationOutput:
  """Generates up to `max_new_tokens` tokens for each prompt.

  Args:
    model: a `CausalLM` (e.g. from `polar_jax.load_model`).
    input_ids: `[B, T]` ints (with `attention_mask` for padding, left or right) or a list of
      token lists of different lengths.
    attention_mask: `[B, T]` 1 for real tokens, or None.
    max_new_tokens: tokens to generate per row (static: part of the compiled program).
    sampler: Greedy(), Temperature(t), TopK(k), TopP(p) or a chain `TopK(k) | Temperature(t)`;
      fields may be per-row sequences.
    stop_tokens: a row stops after emitting any of these.
    seed: PRNG seed for sampling.
    sparsity, routers: Polar Sparsity decoding: a `polar_jax.SparsityConfig` and, for its "router"
      selector or neuron sparsity, `polar_jax.load_routers(DIR, model)`; None = dense. Router weights are
      a dynamic argument of the compiled program (new weights of the same shapes do not recompile).
    options: `polar_jax.DecodeOptions` (kernels, fusions; None: the defaults). Part of the compiled program's
      key: other options compile another program.

  Returns:
    GenerationOutput(tokens `[B, max_new_tokens]`, lengths `[B]`).

  Raises:
    ValueError: bad prompts, or sparsity settings / routers that do not fit the model.
  """
  _check_sampler(sampler)
  options = check_options(options)
  cfg = model.config
  batch = prepare_batch(input_ids, attention_mask, vocab_size=cfg.vocab_size,
                        context=cfg.max_position_embeddings, max_new_tokens=max_new_tokens)
  stop = tuple(int(s) for s in stop_tokens)
  decode, decode_state = make_decoder(model, sparsity, routers, batch=batch.batch, options=options)
  graphdef, state = nnx.split(model)
  out, gen = _generate_program(
      graphdef, state, jnp.asarray(batch.tokens_bt), jnp.asarray(batch.lengths_b), jnp.asarray(_real_rows(batch)),
      sampler.per_row(batch.tokens_bt.shape[0]), jax.random.key(seed), decode_state,
      max_new_tokens=int(max_new_tokens), max_len=batch.max_len, stop_tokens=stop,
      pad_id=_pad_token(model, stop), decode=decode, loop_graph=options.loop_graph)
  out, gen = to_host((out, gen))   # device_get, gathering arrays spread over processes (multi-host)
  return GenerationOutput(np.asarray(out[:batch.batch]), np.asarray(gen[:batch.batch]))


# ---- streaming: a host loop over the same jitted step ----------------------------------------
@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "mesh", "kv_dtype"))
def _prefill_program(graphdef, state, tokens_bt, lengths_b, *, max_len, mesh=None, kv_dtype=None):
  TRACE_COUNTS["prefill"] += 1
  model = nnx.merge(graphdef, state)
  cache = KVCache.init(model.config, tokens_bt.shape[0], max_len, model.dtype, kv_dtype)
  return model.prefill(tokens_bt, lengths_b, cache, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("graphdef", "decode"), donate_argnames=("cache",))
def _step_program(graphdef, state, tok_b, cache, decode_state, active_b, *, decode):
  TRACE_COUNTS["step"] += 1
  model = nnx.merge(graphdef, state)
  return decode(model, tok_b, cache, decode_state, active_b)


_sample_jit = jax.jit(_sample)


def stream(model: CausalLM, input_ids, attention_mask=None, *, max_new_tokens: int,
           sampler: Sampler = Greedy(), stop_tokens: Sequence[int] = (), seed: int = 0,
           sparsity=None, routers=None, options: DecodeOptions | None = None) -> Iterator[np.ndarray]:
  """Same arguments as `generate`; yields each step's tokens `[B]` (pad id once a row stopped).

  Stops after `max_new_tokens` steps or when every row has emitted a stop token. Works on a tensor-parallel model
  and under `jax.distributed` (every process runs the loop and gets every row's tokens, as with `generate`).
  """
  _check_sampler(sampler)
  options = check_options(options)
  cfg = model.config
  batch = prepare_batch(input_ids, attention_mask, vocab_size=cfg.vocab_size,
                        context=cfg.max_position_embeddings, max_new_tokens=max_new_tokens)
  stop = np.asarray(tuple(int(s) for s in stop_tokens), np.int64)
  pad_id = _pad_token(model, tuple(stop.tolist()))
  decode, decode_state = make_decoder(model, sparsity, routers, batch=batch.batch, options=options)
  graphdef, state = nnx.split(model)
  rows = sampler.per_row(batch.tokens_bt.shape[0])
  key = jax.random.key(seed)
  logits, cache = _prefill_program(graphdef, state, jnp.asarray(batch.tokens_bt),
                                   jnp.asarray(batch.lengths_b), max_len=batch.max_len, mesh=decode.mesh,
                                   kv_dtype=options.kv_dtype)
  done = ~_real_rows(batch)
  for step in range(max_new_tokens):
    if step:
      logits, cache = _step_program(graphdef, state, jnp.asarray(tok), cache, decode_state,
                                    jnp.asarray(~done), decode=decode)
    key, sub = jax.random.split(key)
    tok = np.asarray(to_host(_sample_jit(rows, logits, sub)))
    tok = np.where(done, pad_id, tok).astype(np.int32)
    yield tok[:batch.batch]
    done |= np.isin(tok, stop)
    if done[:batch.batch].all():
      return
