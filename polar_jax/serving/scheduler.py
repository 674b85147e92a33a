"""Scheduling decisions of the serving engine, as pure functions of host state (no device work here).

  * which prompt-length and prefill-row buckets exist (fixed at start-up: one compiled prefill per pair);
  * which waiting requests the next prefill takes (first come first served: the oldest request's length bucket,
    then younger ones of the same bucket while slots, rows and the token budget allow);
  * which decode-step variant a round runs, from the number of active rows (`StepVariant`, `choose_variant`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from polar_jax.generation import length_bucket


def length_buckets(max_len: int) -> tuple[int, ...]:
  """Every prompt-length bucket a prompt shorter than `max_len` can fall in (`generation.length_bucket`, capped
  at `max_len`)."""
  return tuple(sorted({min(length_bucket(n), max_len) for n in range(1, max_len)}))


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


def prefill_shapes(max_len: int, prefill_rows: int, prefill_max_tokens: int) -> tuple[tuple[int, int], ...]:
  """Every (rows, bucket) prefill program the engine can run."""
  shapes = []
  for t in length_buckets(max_len):
    limit = rows_for(t, prefill_rows, prefill_max_tokens)
    shapes += [(r, t) for r in row_buckets(prefill_rows) if r <= row_bucket(limit, prefill_rows)]
  return tuple(shapes)


def take_prefill_group(lengths: Sequence[int], free_slots: int, *, max_len: int, prefill_rows: int,
                       prefill_max_tokens: int) -> tuple[list[int], int]:
  """(indices into `lengths` (waiting prompts, oldest first) that the next prefill takes, their bucket)."""
  if not lengths or free_slots < 1:
    return [], 0
  bucket = bucket_of(lengths[0], max_len)
  limit = min(free_slots, rows_for(bucket, prefill_rows, prefill_max_tokens))
  picked = [i for i, n in enumerate(lengths) if bucket_of(n, max_len) == bucket][:limit]
  return picked, bucket


@dataclasses.dataclass(frozen=True)
class StepVariant:
  """One compiled decode-step variant: its name ("dense" or "sparse"), the static step, its dynamic state, the
  fraction of KV groups it reads and of MLP layers it runs dense (for the metrics)."""

  name: str
  decode: Any
  state: Any
  attention_density: float
  mlp_dense_fallback: float


def choose_variant(active_rows: int, variants: dict[str, StepVariant], sparse_min_rows: int) -> StepVariant:
  """The sparse variant when there is one and at least `sparse_min_rows` rows are active, else the dense one."""
  if "sparse" in variants and active_rows >= sparse_min_rows:
    return variants["sparse"]
  return variants["dense"]


def describe_step(decode, config) -> tuple[float, float]:
  """(fraction of KV groups a step reads, averaged over layers; fraction of MLP layers run dense with neuron
  sparsity on, else 0) of a decode step (`sparse_decode.SparseDecode` or the dense step)."""
  groups = getattr(decode, "groups", None)
  g = config.num_kv_heads
  density = 1.0 if groups is None else sum((k if k is not None else g) / g for k in groups) / len(groups)
  neuron_k = getattr(decode, "neuron_k", None)
  fallback = 0.0 if neuron_k is None else sum(k is None for k in neuron_k) / len(neuron_k)
  return density, fallback
