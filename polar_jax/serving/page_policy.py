"""The serving engine's page policy over a paged KV cache (`EngineOptions.kv_layout="paged"`): a base of `Engine`.

Host-side decisions only, on the engine's state (its slots' requests `_seqs`, the queue, the chunked prefills and
`pages`, a `pages.SlotPages`): the pages a request claims when admitted (its prompt's cached prefix pages shared,
fresh ones for the rest and its first rounds, beyond a page per running request), the pages each running request
gets before a round, the preemption of the most recently admitted request when pages run out, the prefix-cache
lookups of waiting requests, and sending the host's page table to the device. Every method is a no-op or trivial
with a contiguous cache (`pages` None).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np

from polar_jax.paged import pages_needed
from polar_jax.paged_kv_cache import PagedLayout
from polar_jax.serving import programs
from polar_jax.serving.pages import SlotPages, resolve_num_pages
from polar_jax.serving.request import RequestHandle


@dataclasses.dataclass(frozen=True, eq=False)
class Seq:
  """A request in a slot: the tokens prefilled for it (its prompt, after a preemption also the tokens it had made),
  how many tokens it had made before (`done`), its admission order (preemption takes the latest) and its slot."""

  handle: RequestHandle
  prompt: tuple[int, ...]
  done: int
  order: int
  slot: int


def prompt_of(h: RequestHandle) -> tuple[int, ...]:
  """What a request prefills when admitted: its prompt and every token it has made so far."""
  return h.prompt_ids + tuple(h.token_ids)


class PagePolicy:
  """The page policy methods of `Engine` (see the module docstring)."""

  def _slot_pages(self) -> SlotPages:
    """The paged cache's host bookkeeping (`EngineOptions.kv_layout` = "paged")."""
    if self.mesh is not None:
      raise ValueError("the paged KV cache runs on one device; serve a sharded model with "
                       "EngineOptions(kv_layout=\"contiguous\")")
    window = self.config.sliding_window
    if window is not None:   # the paged decode attention has no window start (`Attention` refuses it too)
      raise ValueError(f"the paged KV cache has no sliding window (the model's is {window} tokens); use "
                       f"EngineOptions(kv_layout=\"contiguous\")")
    o = self.opts
    max_pages = pages_needed(self.max_len, o.page_size)
    page_bytes = PagedLayout(o.page_size, 1, 1).page_bytes(self.config, self.model.dtype, self.kv_dtype)
    num_pages = resolve_num_pages(o.num_pages, o.kv_memory_fraction, page_bytes, self.max_batch, max_pages)
    return SlotPages(PagedLayout(o.page_size, num_pages, max_pages), self.max_batch,
                     o.prefix_caching and self.chunk is not None)

  def _sync_table(self) -> None:
    """Sends the host's page table to the device when it changed (a paged cache)."""
    if self.pages is not None and self.pages.dirty:
      self._slots = programs.table_program(self._slots, self.pages.table_bp.copy())
      self.pages.dirty = False

  def _drop_seq(self, slot: int) -> None:
    """Forgets the request in `slot` and frees its pages (the device masks the slot from the next round on)."""
    self._seqs.pop(slot, None)
    if self.pages is not None:
      self.pages.release(slot)

  def _need(self, prompt_len: int, h: RequestHandle, done: int) -> int:
    """Tokens a request may have in its slot after the round about to be dispatched: its prefill, the tokens the
    host has seen it make since (at least its first), and two rounds (the one still unread and the next), capped
    at its whole budget."""
    steps = self.opts.steps_per_round
    known = max(len(h.token_ids) - done, 1)
    return min(prompt_len + known + 2 * steps - 1, self._final(prompt_len, h, done))

  @staticmethod
  def _final(prompt_len: int, h: RequestHandle, done: int) -> int:
    """Tokens a request can have in its slot at most: its prefill and the rest of its budget (the last token it
    makes is sampled, never written)."""
    return prompt_len + h.params.max_tokens - done - 1

  def _reserve(self, entering: Sequence[tuple[RequestHandle, tuple[int, ...]]] = ()) -> int:
    """Pages an admission leaves free: one per running request that may still grow (and per request admitted beside
    it, `entering`, whose first pages do not cover its budget), so the next round does not preempt. A request whose
    pages hold its whole budget needs none. 0 without a paged cache."""
    if self.pages is None:
      return 0
    running = sum(self.pages.short_of(q.slot, self._final(len(q.prompt), q.handle, q.done)) > 0
                  for q in self._seqs.values())
    return running + sum(self._need(len(p), h, len(h.token_ids)) < self._final(len(p), h, len(h.token_ids))
                         for h, p in entering)

  def _grow(self, cancel_b: np.ndarray) -> None:
    """Gives every running request, oldest first, the pages its next round may write; while pages lack, preempts
    the most recently admitted request."""
    if self.pages is None:
      return
    for seq in sorted(self._seqs.values(), key=lambda q: q.order):
      if self._seqs.get(seq.slot) is not seq:   # preempted for an older one
        continue
      while not self.pages.grow(seq.slot, self._need(len(seq.prompt), seq.handle, seq.done)):
        victim = max(self._seqs.values(), key=lambda q: q.order)
        self._preempt(victim, cancel_b)
        if victim is seq:
          break

  def _preempt(self, seq: Seq, cancel_b: np.ndarray) -> None:
    """Frees the request's slot and pages and puts it back at the front of the queue; the round about to be
    dispatched masks its slot, and tokens of the unread round are dropped (it makes them again). The full pages of
    the tokens whose K/V are surely written (its prompt, and its tokens the host has seen but the last) go to the
    prefix cache first, so that its restart prefills only what they miss."""
    cancel_b[seq.slot] = True
    if all(job.slot != seq.slot for job in self._chunking):
      made = seq.handle.token_ids[seq.done:]
      self.pages.publish(seq.slot, (seq.prompt + tuple(made))[:len(seq.prompt) + max(len(made) - 1, 0)])
    self._drop_seq(seq.slot)
    self._chunking = collections.deque(job for job in self._chunking if job.slot != seq.slot)
    with self._cv:
      self._waiting.appendleft(seq.handle)
      self.metrics.slots(sum(o is not None for o in self._owner), len(self._waiting))
    self.preemptions += 1
    self.metrics.preemptions.inc()

  def _prefix_keys(self, h: RequestHandle) -> list[bytes]:
    """The prefix-cache keys of what `h` prefills when admitted (kept while it waits)."""
    n = len(h.prompt_ids) + len(h.token_ids)
    memo = self._keys.get(h.request_id)
    if memo is None or memo[0] != n:
      memo = (n, self.pages.prefix_keys(prompt_of(h)))
      self._keys[h.request_id] = memo
    return memo[1]

  def _cached_flags(self) -> list[bool] | None:
    """Per waiting request, whether a cached prefix lets it skip part of its prefill (None: no prefix caching)."""
    if self.pages is None or not self.pages.prefix_caching:
      return None
    return [self.pages.cached_tokens(self._prefix_keys(h)) > 0 for h in self._waiting]

  def _claim(self, slot: int, h: RequestHandle, prompt: tuple[int, ...], share: bool, reserve: int) -> int | None:
    """Pages for `h` entering `slot` (`SlotPages.claim`; sharing cached prefix pages when `share`): the cached
    tokens, or None when the pages are not there. Counts the prefix-cache lookup."""
    if self.pages is None:
      return 0
    keys = self._prefix_keys(h) if share else []
    cached = self.pages.claim(slot, keys, self._need(len(prompt), h, len(h.token_ids)), reserve)
    if cached is not None and self.pages.prefix_caching:
      self.metrics.prefix_queries.inc(len(prompt))
      self.metrics.prefix_hits.inc(cached)
    return cached

  def _claim_group(self, group: list[tuple[RequestHandle, tuple[int, ...]]], free: Sequence[int]):
    """The leading requests of a prefill group whose pages are there (claimed now, nothing shared: the prefill
    writes every position), each leaving the pages `_reserve` keeps for the requests that may grow."""
    out = []
    for (h, prompt), s in zip(group, free):
      if self._claim(s, h, prompt, share=False, reserve=self._reserve(out)) is None:
        break
      out.append((h, prompt))
    return out

  def _page_metrics(self) -> None:
    if self.pages is not None:
      self.metrics.pages(self.pages.used, self.pages.layout.num_pages, len(self.pages.cache))

