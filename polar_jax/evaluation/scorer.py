"""Log-likelihood scoring with the engine's semantics: dense prefill, then the sparse decode step, teacher-forced.

A scoring request is one document: a token `context` and one or more token `continuations` (the choices of a
multiple-choice question, or the scored rest of a perplexity window). The result is, per continuation, the sum of
log p(continuation token | everything before it) under the decode step that `polar_jax.generate` runs.

Modes (`MODES`):

* ``"engine"``: what a user of `generate` gets. The whole context is prefilled densely (`CausalLM.prefill`, the
  same call `generate` makes), so the first continuation token is scored from the dense prefill logits, exactly as
  `generate` samples its first new token. Every further continuation token is predicted by the decode step
  (`make_decoder(...)`'s `decode(model, tok_b, cache, decode_state, active_b)`, the step inside `generate`'s
  `lax.while_loop`) after feeding the previous *gold* continuation token (teacher forcing). A one-token
  continuation is therefore scored densely in this mode, as it would be generated densely.
* ``"all_tokens"``: the paper's evaluation ("every token sparse in one forward pass"). Nothing is prefilled: the
  cache starts empty and *every* token, context and continuation alike, goes through the sparse decode step, so
  every position attends only to its selected KV groups (layers in `dense_layers` excepted). K/V of all heads are
  still written for every token, so this equals a masked full forward in which each token zeroes the outputs of its
  unselected groups -- the paper's masked-model semantics -- but it runs on our engine's step, not on a second
  model. (Not what generation does: prompts are prefilled densely there.)

Batching: documents are packed into batches of about `max_rows` continuations (all continuations of a document in
one batch, batches of similar lengths). Two jitted programs per batch: `_context_program` processes the documents'
contexts (`[Bd, Tctx]`; ragged contexts compacted to the left as `generate` does) -- dense prefill in engine mode
(one program shared by all decoders, run once per batch), the decode step in a `lax.while_loop` in all_tokens mode
-- and replicates each document's KV cache to its continuation rows; `_continuation_program` runs a
`lax.while_loop` over continuation positions on `[Br]` rows, per decoder. Within one call the batch sizes and the
continuation length are fixed, and context lengths are bucketed to powers of two (at least the 90th percentile of
the call's context lengths), so each decoder compiles once per context bucket; loop trip counts are dynamic.
`fixed_shapes` fixes every length instead, so that one program per decoder serves all tasks (accelerators).
Rows and documents are independent: every selector chooses per row (router, oracle, static) or per (row, position,
token) (random), so a document's scores do not depend on what else is in its batch (except through float rounding,
and for ReLU neuron sparsity, which unions neurons over the batch as the engine does).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from polar_jax.generation import batch_bucket
from polar_jax.kv_cache import KVCache

MODES = ("engine", "all_tokens")
TRACE_COUNTS = {"context": 0, "continuation": 0}


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
  """One document: a context and the continuations to score after it (token ids; the context is not scored).

  Attributes:
    context: the context tokens (at least 1).
    continuations: one or more continuations, each at least 1 token.
  """

  context: tuple[int, ...]
  continuations: tuple[tuple[int, ...], ...]

  def __post_init__(self):
    object.__setattr__(self, "context", tuple(int(t) for t in self.context))
    object.__setattr__(self, "continuations", tuple(tuple(int(t) for t in c) for c in self.continuations))
    if not self.context:
      raise ValueError("a score request needs a non-empty context")
    if not self.continuations or any(len(c) == 0 for c in self.continuations):
      raise ValueError("a score request needs at least one continuation, each with at least one token")


def pow2_bucket(n: int, minimum: int = 1) -> int:
  """Smallest power of two >= max(n, minimum)."""
  n = max(int(n), int(minimum), 1)
  return 1 << (n - 1).bit_length()


def _where_rows(active_b, new, old):
  return jnp.where(active_b.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)


def _keep_lengths(cache: KVCache, old: KVCache, active_b) -> KVCache:
  """The decode step advanced every row; inactive rows keep their length (their stray slot is overwritten later
  or never read)."""
  return dataclasses.replace(cache, lengths_b=jnp.where(active_b, cache.lengths_b, old.lengths_b))


def _token_logprob(logits_bv, tok_b):
  logp = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tok_b[:, None], axis=1)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "decode", "max_len", "use_prefill"))
def _context_program(graphdef, state, pre_bt, pre_len_b, dec_bt, dec_len_b, row_doc_r, decode_state, *, decode,
                     max_len, use_prefill):
  """Documents' contexts: dense prefill of `pre_bt` (engine) and/or `dec_bt` through the decode step (all_tokens).

  Returns, for each continuation row (its document `row_doc_r`), the logits `[Br, V]` after the document's last
  context token and the document's cache (rows `[Br]`).
  """
  TRACE_COUNTS["context"] += 1
  model = nnx.merge(graphdef, state)
  bd = pre_bt.shape[0]
  cache = KVCache.init(model.config, bd, max_len, model.dtype, decode.options.kv_dtype)
  if use_prefill:
    logits, cache = model.prefill(pre_bt, pre_len_b, cache)
  else:
    logits = jnp.zeros((bd, model.config.vocab_size), jnp.float32)

  def body(carry):
    j, logits, cache = carry
    active = j < dec_len_b
    new_logits, new_cache = decode(model, dec_bt[:, j], cache, decode_state, active)
    return j + 1, _where_rows(active, new_logits, logits), _keep_lengths(new_cache, cache, active)

  _, logits, cache = jax.lax.while_loop(lambda c: c[0] < jnp.max(dec_len_b), body, (jnp.int32(0), logits, cache))
  cache = jax.tree_util.tree_map(lambda a: jnp.take(a, row_doc_r, axis=0), cache)
  return jnp.take(logits, row_doc_r, axis=0), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "decode"))
def _continuation_program(graphdef, state, logits, cache, cont_rt, cont_len_r, decode_state, *, decode):
  """Teacher-forced continuations from their documents' caches (`_context_program`'s rows).

  Returns per row (sum of continuation log-probs, number of continuation tokens that were the argmax).
  """
  TRACE_COUNTS["continuation"] += 1
  model = nnx.merge(graphdef, state)
  lp = _token_logprob(logits, cont_rt[:, 0])
  hits = (jnp.argmax(logits, axis=-1) == cont_rt[:, 0]).astype(jnp.int32)

  def body(carry):
    i, lp, hits, cache = carry
    active = i < cont_len_r
    logits, new_cache = decode(model, cont_rt[:, i - 1], cache, decode_state, active)
    tok = cont_rt[:, i]
    lp = lp + jnp.where(active, _token_logprob(logits, tok), 0.0)
    hits = hits + (active & (jnp.argmax(logits, axis=-1) == tok)).astype(jnp.int32)
    return i + 1, lp, hits, _keep_lengths(new_cache, cache, active)

  _, lp, hits, _ = jax.lax.while_loop(lambda c: c[0] < jnp.max(cont_len_r), body, (jnp.int32(1), lp, hits, cache))
  return lp, hits


@dataclasses.dataclass(frozen=True)
class Scores:
  """Per request i and continuation j: `logprob[i][j]` (sum over its tokens), `greedy_hits[i][j]` (its tokens
  that were the argmax of the model's prediction), `num_tokens[i][j]`."""

  logprob: list[np.ndarray]
  greedy_hits: list[np.ndarray]
  num_tokens: list[np.ndarray]


def _pack(requests: Sequence[ScoreRequest], max_rows: int, sort_key) -> list[list[int]]:
  """Request indices grouped into batches of at most `max_rows` continuations (a larger request goes alone),
  in `sort_key` order so that batches hold requests of similar lengths."""
  order = sorted(range(len(requests)), key=sort_key)
  batches, cur, rows = [], [], 0
  for i in order:
    n = len(requests[i].continuations)
    if cur and rows + n > max_rows:
      batches.append(cur)
      cur, rows = [], 0
    cur.append(i)
    rows += n
  if cur:
    batches.append(cur)
  return batches


@dataclasses.dataclass(frozen=True)
class _Batch:
  idx: list[int]
  pre: np.ndarray
  pre_len: np.ndarray
  dec: np.ndarray
  dec_len: np.ndarray
  row_doc: np.ndarray
  cont: np.ndarray
  cont_len: np.ndarray
  max_len: int
  rows: int


@dataclasses.dataclass(frozen=True)
class _Shapes:
  """Shapes fixed for a whole call, so that each decoder compiles its continuation program once per context class."""

  bd: int          # documents per batch
  br: int          # continuation rows per batch
  tc: int          # continuation tokens
  ctx_floor: int   # contexts shorter than this share the bucket `ctx_floor`


def _shapes(requests, batches, engine: bool, fixed: tuple[int, int] | None, max_rows: int) -> _Shapes:
  ctx = np.asarray([len(r.context) for r in requests])
  if fixed is not None:
    tctx, tc = (int(v) for v in fixed)
    too_long = [(len(r.context), max(len(c) for c in r.continuations)) for r in requests
                if len(r.context) > tctx or max(len(c) for c in r.continuations) > tc]
    if too_long:
      raise ValueError(f"fixed shapes (context {tctx}, continuation {tc}) are too small for a request of "
                       f"{too_long[0][0]} context / {too_long[0][1]} continuation tokens")
    br = batch_bucket(max_rows)
    # Engine mode: only the (dense, shared) context program sees Bd, so fit it; all_tokens: one Bd for all calls.
    bd = batch_bucket(max(len(b) for b in batches)) if engine else br
    return _Shapes(bd=bd, br=br, tc=tc, ctx_floor=tctx)
  return _Shapes(bd=batch_bucket(max(len(b) for b in batches)),
                 br=batch_bucket(max(sum(len(requests[i].continuations) for i in b) for b in batches)),
                 tc=pow2_bucket(max(len(c) for r in requests for c in r.continuations), 8),
                 ctx_floor=pow2_bucket(int(np.percentile(ctx, 90)), 16))


def _make_batch(requests, idx, engine: bool, shapes: _Shapes) -> _Batch:
  reqs = [requests[i] for i in idx]
  nr = sum(len(r.continuations) for r in reqs)
  bd, br, tc = shapes.bd, shapes.br, shapes.tc
  tctx = max(pow2_bucket(max(len(r.context) for r in reqs), 16), shapes.ctx_floor)
  tp, td = (tctx, 1) if engine else (1, tctx)
  pre, pre_len = np.zeros((bd, tp), np.int32), np.ones((bd,), np.int32)
  dec, dec_len = np.zeros((bd, td), np.int32), np.zeros((bd,), np.int32)
  row_doc, cont, cont_len = np.zeros((br,), np.int32), np.zeros((br, tc), np.int32), np.zeros((br,), np.int32)
  r = 0
  for d, req in enumerate(reqs):
    ctx = np.asarray(req.context, np.int32)
    if engine:
      pre[d, :len(ctx)], pre_len[d] = ctx, len(ctx)
    else:
      dec[d, :len(ctx)], dec_len[d] = ctx, len(ctx)
    for c in req.continuations:
      row_doc[r] = d
      cont[r, :len(c)], cont_len[r] = c, len(c)
      r += 1
  return _Batch(list(idx), pre, pre_len, dec, dec_len, row_doc, cont, cont_len, tctx + tc, nr)


def score_requests(model, requests: Sequence[ScoreRequest], decoders: Mapping[Any, tuple[Any, Any]] | None = None,
                   *, mode: str = "engine", max_rows: int = 32, fixed_shapes: tuple[int, int] | None = None,
                   progress: bool | str = False) -> dict[Any, Scores]:
  """Scores every continuation of every request under each decoder (see the module docstring for the semantics).

  Args:
    model: the `CausalLM`.
    requests: `ScoreRequest`s.
    decoders: `{name: (decode, decode_state)}` with the decode steps of `polar_jax.sparse_decode.make_decoder`
      (or `selectors.build_decoder`); None = `{"dense": (generation.DenseDecode(), None)}`. In engine mode the
      dense prefill of a batch is computed once and shared by all decoders.
    mode: "engine" or "all_tokens".
    max_rows: continuations per batch (the batch of the decode step).
    fixed_shapes: `(context tokens, continuation tokens)`: use these padded lengths and `batch_bucket(max_rows)`
      documents and rows for every batch, so that one program per decoder serves every call with the same shapes
      (e.g. all tasks; for accelerators, where compiling costs more than padding). ValueError if a request does not
      fit. None: shapes fitted to the requests (see the module docstring).
    progress: show a tqdm bar (a string is used as its description).

  Returns:
    `{name: Scores}`, each in the order of `requests`.
  """
  from polar_jax.generation import DenseDecode
  from polar_jax.options import DecodeOptions
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
  if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
    raise ValueError(f"max_rows must be an integer >= 1, got {max_rows!r}")
  if decoders is None:
    decoders = {"dense": (DenseDecode(), None)}
  cfg = model.config
  if not requests:
    return {name: Scores([], [], []) for name in decoders}
  longest = max(len(r.context) + max(len(c) for c in r.continuations) for r in requests)
  if longest > cfg.max_position_embeddings:
    raise ValueError(f"a request of {longest} tokens is longer than the model's context "
                     f"({cfg.max_position_embeddings})")
  engine = mode == "engine"
  key = lambda i: (pow2_bucket(len(requests[i].context), 16), max(len(c) for c in requests[i].continuations),
                   len(requests[i].context))
  graphdef, state = nnx.split(model)
  results = {name: {} for name in decoders}
  packed = _pack(requests, max_rows, key)
  shapes = _shapes(requests, packed, engine, fixed_shapes, max_rows)
  batches = [_make_batch(requests, idx, engine, shapes) for idx in packed]
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=sum(b.rows for b in batches) * len(decoders), unit="row",
               desc=progress if isinstance(progress, str) else "score", leave=False)
  for b in batches:
    shared = {}
    for name, (decode, decode_state) in decoders.items():
      if engine:   # the prefill is dense whatever the decoder: computed once per batch (and KV cache storage)
        kv_dtype = decode.options.kv_dtype
        if kv_dtype not in shared:
          dense = DenseDecode(DecodeOptions(kv_dtype=kv_dtype))
          shared[kv_dtype] = _context_program(graphdef, state, b.pre, b.pre_len, b.dec, b.dec_len, b.row_doc, None,
                                              decode=dense, max_len=b.max_len, use_prefill=True)
        logits, cache = shared[kv_dtype]
      else:
        logits, cache = _context_program(graphdef, state, b.pre, b.pre_len, b.dec, b.dec_len, b.row_doc,
                                         decode_state, decode=decode, max_len=b.max_len, use_prefill=False)
      lp, hits = jax.device_get(_continuation_program(graphdef, state, logits, cache, b.cont, b.cont_len,
                                                      decode_state, decode=decode))
      r = 0
      for i in b.idx:
        n = len(requests[i].continuations)
        results[name][i] = (np.asarray(lp[r:r + n], np.float64), np.asarray(hits[r:r + n], np.int64))
        r += n
      if bar is not None:
        bar.update(b.rows)
  if bar is not None:
    bar.close()
  lengths = [np.asarray([len(c) for c in r.continuations], np.int64) for r in requests]
  return {name: Scores([res[i][0] for i in range(len(requests))], [res[i][1] for i in range(len(requests))],
                       lengths) for name, res in results.items()}


def dense_reference_logprobs(model, requests: Sequence[ScoreRequest], pad_to: int | None = None) -> list[np.ndarray]:
  """Reference log-likelihoods from a dense full forward pass per continuation (`polar_jax.model.forward`), for
  tests: equal to `score_requests(..., decoders=None)` up to float error. `pad_to` right-pads every sequence to
  one length (one compiled program)."""
  from polar_jax.model import forward
  out = []
  for req in requests:
    vals = []
    for c in req.continuations:
      seq = list(req.context) + list(c)
      n = max(len(seq), pad_to or 0)
      ids, mask = np.zeros((1, n), np.int32), np.zeros((1, n), np.int32)
      ids[0, :len(seq)], mask[0, :len(seq)] = seq, 1
      logits = np.asarray(forward(model, ids, mask)[0, :len(seq)], np.float64)
      logp = logits - _logsumexp(logits)
      pos = np.arange(len(req.context) - 1, len(seq) - 1)
      vals.append(float(logp[pos, np.asarray(seq)[pos + 1]].sum()))
    out.append(np.asarray(vals))
  return out


def _logsumexp(x: np.ndarray) -> np.ndarray:
  m = x.max(axis=-1, keepdims=True)
  return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
