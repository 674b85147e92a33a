"""Scheduling decisions of the serving engine, as pure functions of host state (no device work here).

  * which prompt-length and prefill-row buckets exist (fixed at start-up: one compiled prefill per pair);
  * which waiting requests the next prefill takes (first come first served: the oldest request's length bucket,
    then younger ones of the same bucket while slots, rows and the token budget allow);
  * which row buckets the decode rounds come in (a round steps the smallest bucket holding its rows);
  * which decode-step variant a round runs, from the number of active rows and their context (`StepVariant`,
    `choose_variant`: the measured `cost.CostTable`, or an explicit row threshold).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from polar_jax.generation import length_bucket
from polar_jax.serving.cost import CostTable


def length_buckets(max_len: int, longest: int | None = None) -> tuple[int, ...]:
  """Every prompt-length bucket a prompt shorter than `max_len` (and at most `longest` tokens, when given) can
  fall in (`generation.length_bucket`, capped at `max_len`)."""
  top = max_len - 1 if longest is None else min(longest, max_len - 1)
  return tuple(sorted({min(length_bucket(n), max_len) for n in range(1, top + 1)}))


def bucket_of(n: int, max_len: int) -> int:
  return min(length_bucket(n), max_len)


def row_buckets(prefill_rows: int) -> tuple[int, ...]:
  """Prefill row counts: powers of two below `prefill_rows`, and `prefill_rows` itself."""
  out, r = [], 1
  while r < prefill_rows:
    out.append(r)
    r *= 2
  return tuple(out) + (prefill_rows,)


def rows_for(bucket: int, prefill_rows: int, prefill_max_tokens: int) -> int:
  """Most rows one prefill of `bucket`-token prompts takes (at least 1)."""
  return max(1, min(prefill_rows, prefill_max_tokens // bucket))


def row_bucket(n: int, prefill_rows: int) -> int:
  return next(r for r in row_buckets(prefill_rows) if r >= n)


def chunk_size(max_len: int, prefill_chunk: int | None) -> int | None:
  """The chunk length of chunked prefill, or None when no prompt (at most `max_len` - 1 tokens) exceeds it."""
  return prefill_chunk if prefill_chunk is not None and prefill_chunk < max_len - 1 else None


def chunk_spans(max_len: int, chunk: int | None, count: int) -> tuple[int, ...]:
  """The key spans of the chunk programs (ascending, the last `max_len`): `chunk`, 2 x `chunk`, 4 x `chunk`, ...
  below `max_len`, then `max_len`, keeping the `count` largest. No chunking: ()."""
  if chunk is None:
    return ()
  spans, s = [], chunk
  while s < max_len:
    spans.append(s)
    s *= 2
  return tuple(spans + [max_len])[-count:]


def span_for(end: int, spans: Sequence[int]) -> int:
  """The smallest span holding keys `[0, end)`."""
  return next(s for s in spans if s >= end)


def prefill_shapes(max_len: int, prefill_rows: int, prefill_max_tokens: int, longest: int | None = None,
                   ) -> tuple[tuple[int, int], ...]:
  """Every (rows, bucket) prefill program the engine can run for prompts of at most `longest` tokens (None:
  every prompt that fits `max_len`)."""
  shapes = []
  for t in length_buckets(max_len, longest):
    limit = rows_for(t, prefill_rows, prefill_max_tokens)
    shapes += [(r, t) for r in row_buckets(prefill_rows) if r <= row_bucket(limit, prefill_rows)]
  return tuple(shapes)


def take_prefill_group(lengths: Sequence[int], free_slots: int, *, max_len: int, prefill_rows: int,
                       prefill_max_tokens: int, chunk: int | None = None, cached: Sequence[bool] | None = None,
                       ) -> tuple[list[int], int]:
  """(indices into `lengths` (waiting prompts, oldest first) that the next bucketed prefill takes, their bucket).
  Prompts longer than `chunk`, and those whose `cached` flag says a cached prefix lets them skip part of their
  prefill, are left to chunked prefill."""
  short = [i for i, n in enumerate(lengths) if (chunk is None or n <= chunk) and not (cached and cached[i])]
  if not short or free_slots < 1:
    return [], 0
  bucket = bucket_of(lengths[short[0]], max_len)
  limit = min(free_slots, rows_for(bucket, prefill_rows, prefill_max_tokens))
  picked = [i for i in short if bucket_of(lengths[i], max_len) == bucket][:limit]
  return picked, bucket


def take_chunked(lengths: Sequence[int], free_slots: int, chunk: int | None, lane_busy: bool,
                 cached: Sequence[bool] | None = None) -> int | None:
  """The index of the waiting prompt (oldest first) that starts chunked prefill now: the oldest one longer than
  `chunk` or with a cached prefix (`cached`), when no chunked prefill is running and a slot is free; else None."""
  if chunk is None or lane_busy or free_slots < 1:
    return None
  return next((i for i, n in enumerate(lengths) if n > chunk or (cached and cached[i])), None)


@dataclasses.dataclass(frozen=True)
class StepVariant:
  """One compiled decode-step variant: its name ("dense" or "sparse"), the static step, its dynamic state, the
  fraction of KV groups it reads and of MLP layers it runs dense (for the metrics)."""

  name: str
  decode: Any
  state: Any
  attention_density: float
  mlp_dense_fallback: float


def step_row_buckets(max_batch: int, given: Sequence[int] | None, paged: bool) -> tuple[int, ...]:
  """The decode rounds' row buckets (`EngineOptions.step_rows`): `given` (capped at, and with, `max_batch`), or
  `max_batch` and its halves down to 8 (at most three); just `max_batch` without a paged cache."""
  if not paged:
    return (max_batch,)
  if given is not None:
    return tuple(sorted({min(r, max_batch) for r in given} | {max_batch}))
  out = [max_batch]
  while len(out) < 3 and out[0] % 2 == 0 and out[0] // 2 >= 8:
    out.insert(0, out[0] // 2)
  return tuple(out)


def row_bucket_of(rows: int, buckets: Sequence[int]) -> int:
  """The smallest bucket holding `rows` rows (the largest for more)."""
  return next((b for b in buckets if b >= rows), buckets[-1])


def choose_variant(active_rows: int, variants: dict[str, StepVariant], *, table: CostTable | None = None,
                   sparse_min_rows: int | None = None, context: float | None = None) -> StepVariant:
  """The step variant a round with `active_rows` rows of mean `context` tokens runs: with `sparse_min_rows`, the
  sparse one from that many rows on; else the cheapest by `table` (`CostTable.cheapest`, dense on a tie); dense
  when there is no sparse variant, no table, or no active row."""
  if "sparse" not in variants or active_rows < 1:
    return variants["dense"]
  if sparse_min_rows is not None:
    return variants["sparse" if active_rows >= sparse_min_rows else "dense"]
  if table is None:
    return variants["dense"]
  return variants[table.cheapest(active_rows, context, among=tuple(variants))]


def describe_step(decode, config) -> tuple[float, float]:
  """(fraction of KV groups a step reads, averaged over layers; fraction of MLP layers run dense with neuron
  sparsity on, else 0) of a decode step (`sparse_decode.SparseDecode` or the dense step)."""
  groups = getattr(decode, "groups", None)
  g = config.num_kv_heads
  density = 1.0 if groups is None else sum((k if k is not None else g) / g for k in groups) / len(groups)
  neuron_k = getattr(decode, "neuron_k", None)
  fallback = 0.0 if neuron_k is None else sum(k is None for k in neuron_k) / len(neuron_k)
  return density, fallback
