"""Continuous batching: `Engine` owns a KV cache of `max_batch` slots and a scheduler thread that fills them.

    engine = Engine(model, max_batch=32, max_len=2560, tokenizer=tok)
    handle = engine.submit(prompt_ids, SamplingParams(max_tokens=128, temperature=0.7, seed=1))
    for token in handle: ...                     # or `async for`, or handle.result()
    outputs = engine.generate(prompts, SamplingParams(max_tokens=64))   # offline: results in prompt order
    engine.shutdown()

Each scheduler round: requests whose callers cancelled them end (their slots are masked on the device and freed);
waiting requests are admitted into free slots (prompts up to `EngineOptions.prefill_chunk` tokens: a bucketed
prefill, then per request its first token and one insert; the oldest longer prompt: a slot, then one chunk of its
prefill per round, written straight into the slot); one round of up to `steps_per_round` decode steps runs over
every slot (`programs.step_program()`), with the step variant the cost table finds cheapest for the active rows
(`scheduler.choose_variant`, `cost.CostTable`). Rounds are pipelined: the next round is dispatched before the
previous one's tokens are read, so the host's work (handing out tokens, admitting requests) overlaps the device's;
a request that ended is noticed, and its slot freed, one round later (the device already masks it).

Programs are fixed at start-up (`compiled_programs`): a prefill and an insert per (rows, length bucket), a first-token
sampler per row count, a prefill chunk, one decode round per step variant, the cost measurement's occupancy setter and
the KV-group selection probe; with `EngineOptions.warmup` they are compiled then, and serving compiles nothing more.
A model sharded over a mesh runs with the slots' KV cache sharded by KV group, as `polar_jax.generate` shards its.

KV layouts (`EngineOptions.kv_layout`): "paged" (default, one device) keeps K/V in pages handed out by the host
(`pages.SlotPages`): a request is admitted when its prompt's pages and its first rounds' pages are available (beyond
one page per running request), each running request gets the pages its next round may write before that round is
dispatched, and when pages run out the most recently admitted request is preempted: its pages are freed and it
goes back to the front of the queue, to be prefilled again later from its prompt and the tokens it had made (they
are not streamed twice). With prefix caching a prompt whose first pages are cached goes to the chunk lane and
prefills only the rest. "contiguous": one `max_len` row per slot (`KVCache`), tensor parallelism included.

Batch independence: a request's greedy tokens with the dense step, or with head sparsity (the router, oracle and
random selectors choose per row), equal `polar_jax.generate`'s for it alone, whether its prompt is prefilled whole
or in chunks, provided the variant does not change under it (`sparse_min_rows=1`, or a dense engine). Neuron
sparsity (`mlp="router"`) is not batch independent by design: the batch-union neuron set is chosen from all active
rows (and sized for `max_batch`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from pallas_kernels import kv_quant
from polar_jax.compile_options import decode_loop_options
from polar_jax.kv_cache import storage_dtype
from polar_jax.sharding import model_mesh
from polar_jax.sparse_decode import make_decoder
from polar_jax.serving import programs
from polar_jax.serving import scheduler as sched
from polar_jax.serving.cost import CostTable, context_points, measure_table, occupancy_points, timed
from polar_jax.paged import pages_needed
from polar_jax.serving.metrics import EngineMetrics
from polar_jax.serving.page_policy import PagePolicy, Seq, prompt_of
from polar_jax.serving.selection_stats import probes, realised_density
from polar_jax.serving.params import EngineOptions, SamplingParams
from polar_jax.serving.request import EngineClosedError, QueueFullError, RequestHandle, RequestOutput


def _decoders(model, sparsity, routers, max_batch: int, options) -> tuple[Any, Any, Any]:
  """(dense step, sparse step or None, its state) from `sparse_decode.make_decoder` with `options` (a
  `polar_jax.DecodeOptions`, None for the defaults)."""
  dense, _ = make_decoder(model, None, None, batch=max_batch, options=options)
  if sparsity is None and routers is None:
    return dense, None, None
  decode, state = make_decoder(model, sparsity, routers, batch=max_batch, options=options)
  if decode == dense:   # the settings compute exactly the dense step
    return dense, None, None
  return dense, decode, state


def _kv_dtype(opts: EngineOptions, options, model_dtype, mesh) -> str | None:
  """The slots' cache storage: `EngineOptions.kv_dtype`, else `DecodeOptions.kv_dtype` (they must agree when both
  are given); ValueError where an 8-bit cache is not supported (tensor parallelism)."""
  decode_kv = None if options is None else options.kv_dtype
  if opts.kv_dtype is not None and decode_kv is not None and opts.kv_dtype != decode_kv:
    raise ValueError(f"EngineOptions.kv_dtype={opts.kv_dtype!r} and DecodeOptions.kv_dtype={decode_kv!r} differ; "
                     "give one of them")
  kv_dtype = opts.kv_dtype or decode_kv
  if kv_quant.is_8bit(storage_dtype(model_dtype, kv_dtype)) and mesh is not None:
    raise ValueError(f"kv_dtype={kv_dtype!r}: the 8-bit KV cache runs on one device, not a tensor-parallel model")
  return kv_dtype


@dataclasses.dataclass
class _ChunkJob:
  """A prompt being prefilled in chunks into `slot`; `start`: its next chunk's first position."""

  handle: RequestHandle
  slot: int
  start: int = 0


class Engine(PagePolicy):
  """A continuous-batching decode engine over one model (see the module docstring).

  Args:
    model: a `CausalLM` on one device, or sharded over a mesh (`polar_jax.sharding.shard_model`, `load_model(mesh=)`):
      then the slots' KV cache is sharded by KV group as `generate`'s (one process).
    max_batch: KV cache slots (requests decoded together).
    max_len: tokens per slot: a request's prompt + `max_tokens` must fit.
    sparsity, routers: Polar Sparsity settings for the sparse step variant (as `polar_jax.generate`).
    options: a `polar_jax.DecodeOptions` for the decode steps, or None.
    tokenizer: its `eos_token_id` joins the model's end-of-sequence tokens as default stop tokens.
    engine_options: `EngineOptions` (rounds, step-variant choice, queue size, prefill batching and chunks, warm-up).
    model_name: the `model_name` label of the metrics.
  """

  def __init__(self, model, *, max_batch: int, max_len: int, sparsity=None, routers=None, options=None,
               tokenizer=None, engine_options: EngineOptions | None = None, model_name: str = "polar"):
    cfg = model.config
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
      raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 2 <= max_len <= cfg.max_position_embeddings:
      raise ValueError(f"max_len must be an integer in [2, {cfg.max_position_embeddings}] (the model's context), "
                       f"got {max_len!r}")
    self.opts = engine_options or EngineOptions()
    if not isinstance(self.opts, EngineOptions):
      raise TypeError(f"engine_options must be an EngineOptions, got {type(self.opts).__name__}")
    self.model, self.max_batch, self.max_len, self.tokenizer = model, max_batch, max_len, tokenizer
    self.config = cfg
    eos = set(cfg.eos_token_ids)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
      eos.add(int(tokenizer.eos_token_id))
    self.eos_ids = tuple(sorted(eos))
    if len(self.eos_ids) > self.opts.max_stop_tokens:
      raise ValueError(f"the model has {len(self.eos_ids)} end-of-sequence tokens, more than "
                       f"EngineOptions.max_stop_tokens={self.opts.max_stop_tokens}")

    dense, sparse, sparse_state = _decoders(model, sparsity, routers, max_batch, options)
    self.variants = {"dense": sched.StepVariant("dense", dense, None, 1.0, 0.0)}
    if sparse is not None:
      density, fallback = sched.describe_step(sparse, cfg)
      self.variants["sparse"] = sched.StepVariant("sparse", sparse, sparse_state, density, fallback)
    self.chunk = sched.chunk_size(max_len, self.opts.prefill_chunk)
    self.chunk_spans = sched.chunk_spans(max_len, self.chunk, self.opts.prefill_key_spans)
    self.prefill_shapes = sched.prefill_shapes(max_len, self.opts.prefill_rows, self.opts.prefill_max_tokens,
                                               self.chunk)
    self.mesh = model_mesh(model)
    if self.mesh is not None and jax.process_count() > 1:
      raise ValueError("the serving engine runs in one process; this model is sharded over several processes")
    self.kv_dtype = _kv_dtype(self.opts, options, self.model.dtype, self.mesh)
    self.pages = self._slot_pages() if self.opts.kv_layout == "paged" else None
    if self.opts.step_rows is not None and self.pages is None:
      raise ValueError("EngineOptions.step_rows needs the paged layout (the contiguous cache steps every slot)")
    self.step_rows = sched.step_row_buckets(max_batch, self.opts.step_rows, self.pages is not None)
    self._graphdef, self._state = nnx.split(model)
    loop_graph = options.loop_graph if options is not None else True
    self._step = programs.step_program(decode_loop_options(loop_graph) or None)
    layout = self.pages.layout if self.pages is not None else None
    self._slots = programs.place_slots(
        programs.init_slots(cfg, max_batch, max_len, model.dtype, self.opts.max_stop_tokens, layout,
                            kv_dtype=self.kv_dtype), self.mesh)
    self.metrics = EngineMetrics(model_name, max_batch)
    self.preemptions = 0
    self._seqs: dict[int, Seq] = {}   # slot -> the request in it
    self._order = itertools.count()
    self._keys: dict[int, tuple[int, list[bytes]]] = {}   # request id -> (tokens, prefix-cache keys) while waiting
    self.metrics.mlp_fallback.set(self.variants["sparse"].mlp_dense_fallback if sparse is not None else 0.0)
    self.variant_rounds = collections.Counter()   # rounds run per step variant
    self.bucket_rounds = collections.Counter()    # rounds run per row bucket
    sparse_decode = self.variants["sparse"].decode if sparse is not None else None
    self._probes = self.opts.selection_probe_every > 0 and sparse is not None and probes(sparse_decode)
    # adaptive budgets: rows keep fewer groups than the layers' k; the sparse rounds' density is then the one the
    # latest selection probe realised (None until a probe has counted rows; without probes, k is reported)
    self._adaptive = sparse_decode is not None and sparse_decode.masses is not None
    self._realised_density: float | None = None

    self._cv = threading.Condition()
    self._waiting: collections.deque[RequestHandle] = collections.deque()
    self._owner: list[RequestHandle | None] = [None] * max_batch
    self._chunking: collections.deque[_ChunkJob] = collections.deque()   # prompts being prefilled in chunks
    self._ids = itertools.count()
    self._sparse_rounds = 0
    self._seeds = np.random.default_rng()
    self._closing = False     # no new requests
    self._stop = False        # the scheduler exits when idle
    self._failed: str | None = None
    self.warmup_s = self._warmup() if self.opts.warmup else 0.0
    self.cost_table = self._cost_table()
    self._thread = threading.Thread(target=self._run, name="polar-serve-scheduler", daemon=True)
    self._thread.start()

  # ---- public API ---------------------------------------------------------------------------
  @property
  def compiled_programs(self) -> int:
    """Programs the engine runs: a prefill and an insert per (rows, length bucket), a first-token sampler per row
    count, a prefill chunk per key span (when prompts can be longer than a chunk), a decode round per variant and
    row bucket, the warm-up's occupancy setter when it measures the cost table, the KV-group selection probe when
    it runs, and the page-table setter with a paged cache."""
    measured = "sparse" in self.variants and self.opts.sparse_min_rows is None and self.opts.cost_table == "measure"
    return (2 * len(self.prefill_shapes) + len({r for r, _ in self.prefill_shapes}) + len(self.chunk_spans)
            + len(self.variants) * len(self.step_rows) + measured + self._probes + (self.pages is not None))

  def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> RequestHandle:
    """Queues a request; returns its handle at once.

    Raises:
      ValueError: an empty prompt, token ids outside the vocabulary, prompt + max_tokens over `max_len`, too many
        stop tokens.
      QueueFullError: `EngineOptions.max_waiting` requests are already waiting.
      EngineClosedError: the engine is shut down.
    """
    return self._submit(prompt_ids, params, block=False)

  def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None,
               ) -> list[RequestOutput]:
    """Every prompt through the continuous batch (waiting for queue space as needed); outputs in prompt order."""
    prompts = list(prompts)
    if params is None or isinstance(params, SamplingParams):
      params = [params] * len(prompts)
    params = list(params)
    if len(params) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
    handles = [self._submit(p, sp, block=True) for p, sp in zip(prompts, params)]
    return [h.result() for h in handles]

  def shutdown(self, *, drain: bool = False, timeout: float | None = None) -> None:
    """Stops the engine: with `drain`, running and waiting requests finish first; else they end "cancelled".
    Idempotent."""
    with self._cv:
      self._closing = True
      if not drain:
        for h in list(self._waiting) + [h for h in self._owner if h is not None]:
          h._cancel.set()   # pylint: disable=protected-access
      self._stop = True
      self._cv.notify_all()
    self._thread.join(timeout)

  def __enter__(self) -> "Engine":
    return self

  def __exit__(self, *exc) -> None:
    self.shutdown()

  @property
  def alive(self) -> bool:
    return self._thread.is_alive() and self._failed is None

  def stats(self) -> dict[str, Any]:
    """Slots in use, requests waiting, prompts being prefilled in chunks, requests per decode step (mean over the
    steps run, peak), rounds per step variant and per row bucket, programs, the cost table (`CostTable.to_mapping`;
    None when there is no choice or `sparse_min_rows` decides), and with a paged cache the pages in use (held or
    cached), total and cached, and the preemptions so far."""
    with self._cv:
      mean_rows, peak_rows = self.metrics.decode_rows()
      out = {"running": sum(h is not None for h in self._owner), "waiting": len(self._waiting),
             "prefilling": len(self._chunking), "decode_rows_mean": mean_rows, "decode_rows_peak": peak_rows,
             "variant_rounds": dict(self.variant_rounds), "bucket_rounds": dict(sorted(self.bucket_rounds.items())),
             "compiled_programs": self.compiled_programs,
             "cost_table": self.cost_table.to_mapping() if self.cost_table is not None else None}
      if self.pages is not None:
        out.update(pages_used=self.pages.used, pages_total=self.pages.layout.num_pages,
                   pages_cached=len(self.pages.cache), preemptions=self.preemptions)
      return out

  # ---- submission ---------------------------------------------------------------------------
  def _check(self, prompt_ids, params: SamplingParams) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if not isinstance(params, SamplingParams):
      raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    ids = np.asarray(prompt_ids)
    if ids.ndim != 1 or ids.size == 0:
      raise ValueError(f"the prompt must be a non-empty sequence of token ids, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"the prompt must be token ids (integers), got {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
    if bad.size:
      raise ValueError(f"the prompt has token ids outside the vocabulary [0, {self.config.vocab_size}): "
                       f"{bad[:5].tolist()}")
    if ids.size + params.max_tokens > self.max_len:
      raise ValueError(f"the prompt ({ids.size} tokens) + max_tokens ({params.max_tokens}) exceeds the engine's "
                       f"max_len ({self.max_len})")
    if self.pages is not None:
      need = pages_needed(ids.size + params.max_tokens - 1, self.pages.layout.page_size)
      if need > self.pages.layout.num_pages:
        raise ValueError(f"the prompt ({ids.size} tokens) + max_tokens ({params.max_tokens}) needs {need} KV pages, "
                         f"more than the engine's {self.pages.layout.num_pages}")
    stop = tuple(sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))))
    if len(stop) > self.opts.max_stop_tokens:
      raise ValueError(f"{len(stop)} stop tokens (eos included) exceed the engine's max_stop_tokens "
                       f"({self.opts.max_stop_tokens})")
    bad = [t for t in stop if t >= self.config.vocab_size]
    if bad:
      raise ValueError(f"stop_token_ids outside the vocabulary [0, {self.config.vocab_size}): {bad}")
    return tuple(int(t) for t in ids), stop

  def _submit(self, prompt_ids, params, *, block: bool) -> RequestHandle:
    params = params if params is not None else SamplingParams()
    ids, stop = self._check(prompt_ids, params)
    seed = params.seed if params.seed is not None else int(self._seeds.integers(0, 2**31 - 1))
    with self._cv:
      while True:
        if self._closing or self._failed is not None:
          raise EngineClosedError(f"the engine is shut down{': ' + self._failed if self._failed else ''}")
        if len(self._waiting) < self.opts.max_waiting + self._free_slots():   # those with a free slot do not queue
          break
        if not block:
          raise QueueFullError(f"the waiting queue is full (max_waiting={self.opts.max_waiting}, every slot busy); "
                               "retry later")
        self._cv.wait(0.05)
      h = RequestHandle(next(self._ids), ids, params, seed, stop, on_cancel=self._wake)
      self._waiting.append(h)
      self.metrics.slots(sum(o is not None for o in self._owner), len(self._waiting))
      self._cv.notify_all()
    return h

  def _free_slots(self) -> int:
    return sum(o is None for o in self._owner)

  def _wake(self) -> None:
    with self._cv:
      self._cv.notify_all()

  # ---- device programs ----------------------------------------------------------------------
  def _prefill(self, prompts: Sequence[tuple[int, ...]], rows: int, bucket: int):
    tokens = np.zeros((rows, bucket), np.int32)
    lengths = np.ones((rows,), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
      lengths[i] = len(p)
    with jax.profiler.TraceAnnotation("serve_prefill"):
      return programs.prefill_program(self._graphdef, self._state, tokens, lengths, mesh=self.mesh)

  def _request_args(self, h: RequestHandle | None, done: int = 0) -> tuple:
    """A request's (max_tokens, stop tokens, temperature, top-k, top-p, greedy, seed, tokens made before) as the
    programs take them."""
    p = h.params if h is not None else SamplingParams()
    stop = np.full((self.opts.max_stop_tokens,), -1, np.int32)
    if h is not None:
      stop[:len(h.stop_ids)] = h.stop_ids
    return (np.int32(p.max_tokens), stop, np.float32(p.temperature if not p.greedy else 1.0),
            np.int32(p.top_k if p.top_k is not None else self.config.vocab_size), np.float32(p.top_p),
            np.bool_(p.greedy), np.int32(h.seed if h is not None else 0), np.int32(done))

  def _insert(self, prefill, row: int, slot: int, h: RequestHandle | None, done: int = 0):
    logits, cache = prefill
    args = self._request_args(h, done)
    with jax.profiler.TraceAnnotation("serve_insert"):
      first, active = programs.first_token_program(logits, np.int32(row), *args)
      self._slots = programs.insert_program(self._slots, cache, np.int32(row), np.int32(slot), first, active, *args)
    return first, active

  def _chunk(self, prompt: Sequence[int], start: int, slot: int, h: RequestHandle | None, done: int = 0,
             key_span: int | None = None):
    """Prefills the chunk of `prompt` at `start` into `slot`, attending over the smallest key span holding it (or
    `key_span`): (first token, active), meaningful after the last."""
    tokens = np.zeros((self.chunk,), np.int32)
    part = prompt[start:start + self.chunk]
    tokens[:len(part)] = part
    key_span = key_span or sched.span_for(start + len(part), self.chunk_spans)
    with jax.profiler.TraceAnnotation("serve_prefill_chunk"):
      self._slots, first, active = programs.chunk_program(
          self._graphdef, self._state, self._slots, tokens, np.int32(start), np.int32(len(prompt)), np.int32(slot),
          *self._request_args(h, done), mesh=self.mesh, key_span=key_span)
    return first, active

  def _cost_table(self) -> CostTable | None:
    """The table that picks each round's variant: the given one, one measured now (`EngineOptions.cost_table` =
    "measure", with a sparse variant and no `sparse_min_rows` rule), or None (nothing to choose)."""
    if "sparse" not in self.variants or self.opts.sparse_min_rows is not None:
      return None
    if isinstance(self.opts.cost_table, CostTable):
      return self.opts.cost_table
    t0 = time.perf_counter()
    steps = self.opts.steps_per_round
    never = np.zeros((self.max_batch,), bool)

    def run_round(name: str, rows: int, context: int) -> float:
      self._slots = programs.occupy_program(self._slots, np.int32(rows), np.int32(context))
      jax.block_until_ready(self._slots)
      return timed(lambda: self._round(self.variants[name], never, range(rows))) / steps

    table = measure_table(run_round, tuple(self.variants), occupancy_points(self.max_batch),
                          context_points(self.max_len, steps))
    self._slots = programs.occupy_program(self._slots, np.int32(0), np.int32(0))
    if self.pages is not None:   # the measurement spread rows over the pool: the host's table back
      self.pages.dirty = True
      self._sync_table()
    jax.block_until_ready(self._slots)
    self.warmup_s += time.perf_counter() - t0
    return table

  def _probe(self):
    """Dispatches the selection probe on the running rows: (counts `[L, G]`, active rows), on the device."""
    sparse = self.variants["sparse"]
    with jax.profiler.TraceAnnotation("serve_selection_probe"):
      self._slots, counts, rows = programs.probe_program(self._graphdef, self._state, self._slots, sparse.state,
                                                         decode=sparse.decode)
    return counts, rows

  def _round(self, variant: sched.StepVariant, cancel_b: np.ndarray, rows: Sequence[int]):
    """Dispatches a round of decode steps over the slots `rows` (in the smallest row bucket holding them)."""
    rows_r = self._bucket_rows(rows)
    with jax.profiler.TraceAnnotation(f"serve_step_{variant.name}"):
      self._slots, out, n, active = self._step(self._graphdef, self._state, self._slots, variant.state, cancel_b,
                                               rows_r, decode=variant.decode, steps=self.opts.steps_per_round)
    return out, active, n

  def _bucket_rows(self, rows: Sequence[int]) -> np.ndarray | None:
    """Slots `rows` padded with other slots (free ones first) to their row bucket; None for every slot."""
    bucket = sched.row_bucket_of(len(rows), self.step_rows)
    if bucket == self.max_batch:
      return None
    taken = set(rows)
    prefilling = {job.slot for job in self._chunking}
    spare = sorted((s for s in range(self.max_batch) if s not in taken),
                   key=lambda s: (self._owner[s] is not None or s in prefilling, s))
    return np.asarray(sorted(rows) + spare[:bucket - len(rows)], np.int32)

  def _warmup(self) -> float:
    """Compiles and runs every program (twice: the second pass sees the donated state as serving does)."""
    t0 = time.perf_counter()
    cancel_all = np.ones((self.max_batch,), bool)
    for _ in range(2):
      if self.pages is not None:
        self.pages.dirty = True
        self._sync_table()
      for rows, bucket in self.prefill_shapes:
        prefill = programs.prefill_program(self._graphdef, self._state, np.zeros((rows, bucket), np.int32),
                                           np.ones((rows,), np.int32), mesh=self.mesh)
        self._insert(prefill, 0, 0, None)
      for span in self.chunk_spans:   # a chunk that is not a prompt's last: slot 0 held, freed by the rounds below
        self._chunk([0] * (self.chunk + 1), 0, 0, None, key_span=span)
      for variant in self.variants.values():
        for rows in self.step_rows:
          self._round(variant, cancel_all, range(rows))
      if self._probes:
        self._probe()
    jax.block_until_ready(self._slots)
    return time.perf_counter() - t0

  # ---- the scheduler thread -----------------------------------------------------------------
  def _run(self) -> None:
    pending = None
    try:
      while True:
        with self._cv:
          while (not self._stop and pending is None and not self._waiting
                 and not any(h is not None for h in self._owner)):
            self._cv.wait()
          if self._stop and pending is None and not self._waiting and not any(h is not None for h in self._owner):
            return
        now = time.perf_counter()
        self._drop_cancelled_waiting(now)
        cancel_b = self._cancel_running(now)
        self._grow(cancel_b)
        firsts = self._admit() + self._next_chunks()
        self._sync_table()
        prefilling = {job.slot for job in self._chunking}
        snapshot = [(s, seq) for s, seq in self._seqs.items() if not seq.handle.finished and s not in prefilling]
        dispatched = None
        if snapshot or cancel_b.any():
          context = sum(len(q.handle.prompt_ids) + len(q.handle.token_ids) for _, q in snapshot) / max(1, len(snapshot))
          variant = sched.choose_variant(len(snapshot), self.variants, table=self.cost_table,
                                         sparse_min_rows=self.opts.sparse_min_rows, context=context)
          probe = self._maybe_probe(variant)
          rows = [s for s, _ in snapshot]
          dispatched = (self._round(variant, cancel_b, rows), snapshot, variant, probe,
                        sched.row_bucket_of(len(rows), self.step_rows))
        with self._cv:   # slots cancelled or preempted this round are masked by the dispatched step: reusable now
          for s in np.flatnonzero(cancel_b):
            self._owner[s] = None
          if cancel_b.any():
            self.metrics.slots(sum(o is not None for o in self._owner), len(self._waiting))
            self._cv.notify_all()
        self._page_metrics()
        self._take_firsts(firsts)
        if pending is not None:
          self._take_round(*pending)
        pending = dispatched
    except Exception as e:  # noqa: BLE001  (a failed program must not leave callers waiting forever)
      self._fail(f"{type(e).__name__}: {e}")
      raise

  def _fail(self, message: str) -> None:
    now = time.perf_counter()
    with self._cv:
      self._failed = message
      self._closing = True
      victims = list(dict.fromkeys(list(self._waiting) + [h for h in self._owner if h is not None]))
      self._waiting.clear()
      self._chunking.clear()
      self._seqs.clear()
      self._owner = [None] * self.max_batch
    for h in victims:
      h.finish("cancelled", now, error=message)

  def _end(self, h: RequestHandle, reason: str, now: float) -> None:
    h.finish(reason, now)
    m = self.metrics
    m.finished(reason)
    m.e2e.observe(now - h.arrival_s)
    m.req_prompt.observe(len(h.prompt_ids))
    m.req_gen.observe(len(h.token_ids))

  def _drop_cancelled_waiting(self, now: float) -> None:
    with self._cv:
      gone = [h for h in self._waiting if h.cancel_requested]
      for h in gone:
        self._waiting.remove(h)
        self._keys.pop(h.request_id, None)
      if gone:
        self.metrics.slots(sum(o is not None for o in self._owner), len(self._waiting))
        self._cv.notify_all()
    for h in gone:
      self._end(h, "cancelled", now)

  def _cancel_running(self, now: float) -> np.ndarray:
    cancel_b = np.zeros((self.max_batch,), bool)
    for s, h in enumerate(self._owner):
      if h is not None and h.cancel_requested and not h.finished:
        cancel_b[s] = True
        self._end(h, "cancelled", now)
        self._drop_seq(s)
    self._chunking = collections.deque(job for job in self._chunking if not cancel_b[job.slot])
    return cancel_b

  # ---- admission ----------------------------------------------------------------------------
  def _take_slots(self, group: Sequence[tuple[RequestHandle, tuple[int, ...]]], free: Sequence[int]) -> None:
    """Moves `group` (requests and what they prefill) from the queue into slots `free` (called holding the lock)."""
    now = time.perf_counter()
    for (h, prompt), s in zip(group, free):
      self._waiting.remove(h)
      self._keys.pop(h.request_id, None)
      self._owner[s] = h
      self._seqs[s] = Seq(h, prompt, len(h.token_ids), next(self._order), s)
      if h.admitted_s is None:
        h.admitted_s = now
        self.metrics.queue.observe(now - h.arrival_s)
    self.metrics.slots(sum(o is not None for o in self._owner), len(self._waiting))
    self._cv.notify_all()

  def _start_chunked(self) -> None:
    """Gives the oldest waiting prompt longer than a chunk (or with a cached prefix) a slot and its pages, and
    starts its chunked prefill (from the end of the cached prefix), when none runs."""
    with self._cv:
      free = [s for s, h in enumerate(self._owner) if h is None]
      lengths = [len(h.prompt_ids) + len(h.token_ids) for h in self._waiting]
      if not free or self._chunking:   # nothing can start a chunked prefill: skip the prefix lookups
        return
      i = sched.take_chunked(lengths, len(free), self.chunk, False, self._cached_flags())
      if i is None:
        return
      h = self._waiting[i]
      prompt = prompt_of(h)
      cached = self._claim(free[0], h, prompt, share=True, reserve=self._reserve())
      if cached is None:
        return
      self._take_slots([(h, prompt)], free[:1])
      self._chunking.append(_ChunkJob(h, free[0], cached))

  def _next_chunks(self) -> list[tuple[Seq, Any, Any]]:
    """Runs up to `prefill_chunks_per_round` chunks (`prefill_chunks_backlog` while requests wait for free slots):
    the current chunked prefill's, then (once it is done) the next long prompt's, when one waits and a slot is
    free."""
    firsts, done = [], 0
    while done < self._chunk_limit():
      if done and not self._chunking:
        self._start_chunked()
      if not self._chunking:
        break
      firsts += self._next_chunk()
      done += 1
    return firsts

  def _chunk_limit(self) -> int:
    """Chunks this round may prefill: while requests wait and slots are free for them (a backlog), one more per
    waiting request up to `prefill_chunks_backlog`, so a long queue refills the batch fast and a lone arrival
    barely delays the running requests."""
    with self._cv:
      waiting = len(self._waiting) if any(h is None for h in self._owner) else 0
    return max(self.opts.prefill_chunks_per_round, min(self.opts.prefill_chunks_backlog, 1 + waiting))

  def _next_chunk(self) -> list[tuple[Seq, Any, Any]]:
    """Runs the next chunk of the oldest chunked prefill: the request's first token once its prompt is done."""
    if not self._chunking:
      return []
    self._sync_table()
    job = self._chunking[0]
    seq = self._seqs[job.slot]
    first, active = self._chunk(seq.prompt, job.start, job.slot, job.handle, seq.done)
    n = min(self.chunk, len(seq.prompt) - job.start)
    job.start += n
    self.metrics.prompt_tokens.inc(n)
    if job.start < len(seq.prompt):
      return []
    self._chunking.popleft()
    if self.pages is not None:
      self.pages.publish(job.slot, seq.prompt)
    return [(seq, first, active)]

  def _admit(self) -> list[tuple[Seq, Any, Any]]:
    """Prefills and inserts waiting requests into free slots (slots being cancelled this round stay reserved);
    starts a chunked prefill for the oldest long (or prefix-cached) prompt."""
    self._start_chunked()
    firsts = []
    while True:
      with self._cv:
        free = [s for s, h in enumerate(self._owner) if h is None]
        if not free or not self._waiting:
          return firsts
        lengths = [len(h.prompt_ids) + len(h.token_ids) for h in self._waiting]
        picked, bucket = sched.take_prefill_group(lengths, len(free), max_len=self.max_len,
                                                  prefill_rows=self.opts.prefill_rows,
                                                  prefill_max_tokens=self.opts.prefill_max_tokens, chunk=self.chunk,
                                                  cached=self._cached_flags())
        group = self._claim_group([(self._waiting[i], prompt_of(self._waiting[i])) for i in picked], free)
        if not group:
          return firsts
        self._take_slots(group, free)
      self._sync_table()
      prefill = self._prefill([p for _, p in group], sched.row_bucket(len(group), self.opts.prefill_rows), bucket)
      for row, s in enumerate(free[:len(group)]):
        seq = self._seqs[s]
        first, active = self._insert(prefill, row, s, seq.handle, seq.done)
        firsts.append((seq, first, active))
        self.metrics.prompt_tokens.inc(len(seq.prompt))
        if self.pages is not None:
          self.pages.publish(s, seq.prompt)

  def _take_firsts(self, firsts) -> None:
    if not firsts:
      return
    values = jax.device_get([(f, a) for _, f, a in firsts])
    now = time.perf_counter()
    for (seq, _, _), (first, active) in zip(firsts, values):
      h = seq.handle
      if h.finished or self._seqs.get(seq.slot) is not seq:   # cancelled or preempted meanwhile
        continue
      h.append([int(first)], now)
      if seq.done == 0:
        self.metrics.ttft.observe(now - h.arrival_s)
      self.metrics.generation_tokens.inc()
      if not bool(active):
        self._end(h, "stop" if int(first) in h.stop_ids else "length", now)
        self._release(seq.slot, h)

  def _maybe_probe(self, variant: sched.StepVariant):
    """The selection probe's result before every `selection_probe_every`-th sparse round (the first included)."""
    if not self._probes or variant.name != "sparse":
      return None
    self._sparse_rounds += 1
    return self._probe() if (self._sparse_rounds - 1) % self.opts.selection_probe_every == 0 else None

  def _take_round(self, result, snapshot, variant: sched.StepVariant, probe, bucket: int) -> None:
    out, active, n = jax.device_get(result)
    if probe is not None:
      counts, rows = jax.device_get(probe)
      self.metrics.selections(counts, int(rows))
      if self._adaptive and int(rows) > 0:
        self._realised_density = realised_density(counts, int(rows))
    now = time.perf_counter()
    n = int(n)
    self.variant_rounds[variant.name] += 1
    self.bucket_rounds[bucket] += 1
    density = variant.attention_density
    if variant.name == "sparse" and self._realised_density is not None:
      density = self._realised_density
    self.metrics.round(variant.name, n, len(snapshot), density, bucket)
    for s, seq in snapshot:
      h = seq.handle
      if h.finished or self._seqs.get(s) is not seq:   # cancelled or preempted: its tokens are made again
        continue
      toks = [int(t) for t in out[s, :n] if t != programs.NO_TOKEN]
      if toks:
        last = h.token_times_s[-1] if h.token_times_s else h.arrival_s
        for _ in toks:
          self.metrics.itl.observe((now - last) / len(toks))
        h.append(toks, now)
        self.metrics.generation_tokens.inc(len(toks))
      if not active[s]:
        last_tok = h.token_ids[-1] if h.token_ids else None
        self._end(h, "stop" if last_tok in h.stop_ids else "length", now)
        self._release(s, h)

  def _release(self, slot: int, h: RequestHandle) -> None:
    with self._cv:
      if self._owner[slot] is h:
        self._owner[slot] = None
      seq = self._seqs.get(slot)
      if seq is not None and seq.handle is h:
        self._drop_seq(slot)
      self.metrics.slots(sum(o is not None for o in self._owner), len(self._waiting))
      self._cv.notify_all()
