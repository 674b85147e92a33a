"""The serving engine's choices: per-request `SamplingParams` and per-engine `EngineOptions` (frozen dataclasses)."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping, Sequence

from polar_jax.kv_cache import KV_DTYPES
from polar_jax.serving.cost import CostTable


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request is decoded.

  Attributes:
    max_tokens: tokens to generate at most (the first one, from the prefill, included).
    temperature: 0 = greedy (argmax); > 0 samples.
    top_p: nucleus filter in (0, 1]; 1 = off.
    top_k: keep the k most likely tokens; None = off.
    seed: the request's sampling seed (its tokens do not depend on the rest of the batch); None = one drawn by
      the engine.
    stop_token_ids: extra tokens that end the request (the token is part of the output, as in `generate`).
    ignore_eos: do not stop at the model's / tokenizer's end-of-sequence tokens.
  Filters apply in the order temperature, top-k, top-p.
  """

  max_tokens: int = 16
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int | None = None
  seed: int | None = None
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False

  def __post_init__(self):
    if not _is_int(self.max_tokens) or self.max_tokens < 1:
      raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
    t = self.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
      raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
    p = self.top_p
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
      raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
    if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
      raise ValueError(f"top_k must be an integer >= 1 or None (off), got {self.top_k!r}")
    if self.seed is not None and (not _is_int(self.seed) or not -2**31 <= self.seed < 2**31):
      raise ValueError(f"seed must be a 32-bit integer or None, got {self.seed!r}")
    ids = tuple(self.stop_token_ids)
    if any(not _is_int(i) or i < 0 for i in ids):
      raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
    object.__setattr__(self, "stop_token_ids", ids)
    object.__setattr__(self, "temperature", float(t))
    object.__setattr__(self, "top_p", float(p))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


@dataclasses.dataclass(frozen=True)
class EngineOptions:
  """How the engine schedules (all fixed at start-up: they shape the compiled programs).

  Attributes:
    steps_per_round: decode steps per host round trip (one `lax.while_loop`); more steps amortise the host's work,
      fewer admit waiting requests sooner.
    cost_table: how each round picks its step variant (with sparsity): "measure" (warm-up times the dense and
      the sparse round at 1, 2, 4, ..., max_batch active rows and a short and a long context; each round then runs
      the variant measured cheaper for its active rows and their mean context, dense on a tie), or a given table:
      a `cost.CostTable`, its JSON mapping, or the path of a JSON file (`CostTable.save`). A request's tokens can
      depend on how many others ran beside it whenever the variant changes with the load.
    sparse_min_rows: an explicit rule instead of the cost table: the sparse variant when at least this many rows
      are active, else the dense one (1 = always sparse). None (default) = the cost table decides.
    max_waiting: requests queued beyond the running ones; `submit` raises `QueueFullError` past it.
    prefill_rows: most prompts prefilled together (of one length bucket); row counts are powers of two up to it.
    prefill_max_tokens: at most this many prompt tokens (rows x bucket) per prefill program.
    max_stop_tokens: stop tokens per request (eos included), the width of the device's stop table.
    prefill_chunk: prompts longer than this many tokens are prefilled in chunks of this size straight into their
      slot, `prefill_chunks_per_round` chunks per scheduler round, so running requests keep decoding between chunks
      (one compiled chunk program; the bucketed prefills then only cover prompts up to this length). None = every
      prompt is prefilled whole.
    prefill_chunks_per_round: chunks prefilled between two decode rounds (the next chunk of the prompt being
      prefilled, or the first of the next long prompt once it is done) while nothing else waits for a free slot.
      More admit long prompts faster and lengthen the running requests' gap between tokens while they are
      prefilled.
    prefill_chunks_backlog: the most chunks between two decode rounds while there is a backlog (requests wait and
      slots are free for them): one more chunk per waiting request, up to this many (at least
      `prefill_chunks_per_round`). A long queue refills the batch as fast as slots free up, so the decode steps
      stay full at saturation (throughput first), while a lone arrival gets `prefill_chunks_per_round` (the
      running requests' gap between tokens first).
    prefill_key_spans: how many key spans the chunk programs come in (`scheduler.chunk_spans`: the chunk size
      doubled up to `max_len`, the largest kept): a chunk attends over the smallest span holding its prompt so
      far instead of the slot's whole `max_len`, one compiled chunk program per span; 1 = every chunk reads
      `max_len` keys.
    step_rows: the row buckets of the decode rounds (paged layout): a round gathers the rows it decodes into the
      smallest bucket holding them and steps only those (their state and page-table rows; the page pools are
      shared), so a round's cost follows the running requests, not `max_batch` (one compiled round per bucket
      and step variant, as vLLM's CUDA-graph batch sizes). None: `max_batch` and its halves down to 8, at most
      three buckets; `max_batch` always joins the given sizes. The contiguous layout steps every slot.
    selection_probe_every: every this many sparse rounds, count which KV groups of each layer the running rows'
      sparse step selects (`polar:kv_group_selection_rate`; router and random selectors); 0 = never.
    warmup: compile and run every program once at start-up (else the first requests compile them).
    kv_layout: "paged" (default): K/V in pages of `page_size` tokens handed out as requests grow (one device, no
      sliding window shorter than max_len); "contiguous": one `max_len` row per slot.
    page_size: tokens per page (a multiple of 16).
    num_pages: pages of the paged cache; None: `kv_memory_fraction` of the device's free memory, or without it as
      many pages as a contiguous cache of `max_batch` x `max_len` holds, at most 90% of the free memory (GPU).
    kv_memory_fraction: the fraction (0, 1] of the device's free memory at start-up the pages take (GPU).
    prefix_caching: full prompt pages stay cached after their request and a prompt starting with cached pages
      prefills only the rest (paged layout with chunked prefill on).
    kv_dtype: the slots' KV cache storage (`polar_jax.kv_cache.storage_dtype`): None (the engine's
      `DecodeOptions.kv_dtype`, else the model's dtype), or "int8" / "float8_e4m3fn": 8 bits with per-token scales,
      half the cache memory (one device; both layouts: with `kv_memory_fraction` the paged cache holds about twice
      the pages).
  The decode round's loop graph follows the engine's `DecodeOptions.loop_graph`.
  """

  steps_per_round: int = 4
  cost_table: CostTable | str = "measure"
  sparse_min_rows: int | None = None
  max_waiting: int = 256
  prefill_rows: int = 1
  prefill_max_tokens: int = 8192
  max_stop_tokens: int = 8
  prefill_chunk: int | None = 512
  prefill_chunks_per_round: int = 1
  prefill_chunks_backlog: int = 4
  prefill_key_spans: int = 4
  step_rows: tuple[int, ...] | None = None
  selection_probe_every: int = 64
  warmup: bool = True
  kv_layout: str = "paged"
  page_size: int = 32
  num_pages: int | None = None
  kv_memory_fraction: float | None = None
  prefix_caching: bool = True
  kv_dtype: str | None = None

  def __post_init__(self):
    self._check_kv()
    if self.sparse_min_rows is not None and (not _is_int(self.sparse_min_rows) or self.sparse_min_rows < 1):
      raise ValueError(f"EngineOptions.sparse_min_rows must be an integer >= 1 or None, got {self.sparse_min_rows!r}")
    object.__setattr__(self, "cost_table", _cost_table(self.cost_table))
    for name in ("steps_per_round", "prefill_rows", "prefill_max_tokens", "max_stop_tokens", "prefill_chunks_per_round",
                 "prefill_chunks_backlog", "prefill_key_spans"):
      v = getattr(self, name)
      if not _is_int(v) or v < 1:
        raise ValueError(f"EngineOptions.{name} must be an integer >= 1, got {v!r}")
    if self.prefill_chunk is not None and (not _is_int(self.prefill_chunk) or self.prefill_chunk < 1):
      raise ValueError(f"EngineOptions.prefill_chunk must be an integer >= 1 or None, got {self.prefill_chunk!r}")
    if self.step_rows is not None:
      if isinstance(self.step_rows, (str, bytes)) or not isinstance(self.step_rows, Sequence) or not self.step_rows \
         or not all(_is_int(r) and r >= 1 for r in self.step_rows):
        raise ValueError(f"EngineOptions.step_rows must be None or a non-empty sequence of integers >= 1, got "
                         f"{self.step_rows!r}")
      object.__setattr__(self, "step_rows", tuple(sorted(set(int(r) for r in self.step_rows))))
    if not _is_int(self.selection_probe_every) or self.selection_probe_every < 0:
      raise ValueError(f"EngineOptions.selection_probe_every must be an integer >= 0, got "
                       f"{self.selection_probe_every!r}")
    if not _is_int(self.max_waiting) or self.max_waiting < 0:
      raise ValueError(f"EngineOptions.max_waiting must be an integer >= 0, got {self.max_waiting!r}")


  def _check_kv(self) -> None:
    if self.kv_layout not in ("paged", "contiguous"):
      raise ValueError(f"EngineOptions.kv_layout must be \"paged\" or \"contiguous\", got {self.kv_layout!r}")
    if not _is_int(self.page_size) or self.page_size < 16 or self.page_size % 16:
      raise ValueError(f"EngineOptions.page_size must be a positive multiple of 16, got {self.page_size!r}")
    if self.num_pages is not None and (not _is_int(self.num_pages) or self.num_pages < 1):
      raise ValueError(f"EngineOptions.num_pages must be an integer >= 1 or None, got {self.num_pages!r}")
    f = self.kv_memory_fraction
    if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0):
      raise ValueError(f"EngineOptions.kv_memory_fraction must be a number in (0, 1] or None, got {f!r}")
    if f is not None and self.num_pages is not None:
      raise ValueError("EngineOptions: give num_pages or kv_memory_fraction, not both")
    if not isinstance(self.prefix_caching, bool):
      raise ValueError(f"EngineOptions.prefix_caching must be a bool, got {self.prefix_caching!r}")
    if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPES:
      raise ValueError(f"EngineOptions.kv_dtype must be one of {KV_DTYPES} or None, got {self.kv_dtype!r}")


def _cost_table(value) -> CostTable | str:
  """`EngineOptions.cost_table` as "measure" or a `CostTable` (read from a mapping or a JSON file)."""
  if isinstance(value, CostTable) or value == "measure":
    return value
  if isinstance(value, Mapping):
    return CostTable.from_mapping(value)
  if isinstance(value, (str, os.PathLike)):
    if not os.path.isfile(value):
      raise ValueError(f"EngineOptions.cost_table: {value!r} is neither \"measure\" nor a JSON file")
    return CostTable.load(value)
  raise ValueError(f"EngineOptions.cost_table must be \"measure\", a CostTable, a mapping or a JSON path, "
                   f"got {type(value).__name__}")
