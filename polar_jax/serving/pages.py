"""The engine's host-side page bookkeeping for a paged KV cache: which pages each slot holds, the page table the
device gets, and the prefix cache.

`SlotPages` wraps a `polar_jax.paged.PrefixCache` (over a `PageAllocator`): a request entering a slot takes the
cached pages of its prompt's longest cached prefix (shared, one reference each) and fresh pages for the rest
(`claim`), more pages as it grows (`grow`), and gives every reference back when it ends or is preempted
(`release`); once its prompt's K/V are written its full pages are listed in the prefix cache (`publish`) and stay
there, evictable least recently used, after it ends. The host's page table `table_bp` mirrors the slots' pages
(unused entries: the trash page) and `dirty` says the device's copy is stale.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from polar_jax.paged import OutOfPagesError, PageAllocator, PrefixCache, pages_needed
from polar_jax.paged_kv_cache import PagedLayout


DEFAULT_MEMORY_FRACTION = 0.9   # the most of the device's free memory a default-sized cache takes


def _free_bytes() -> int | None:
  """The device's free memory (its allocator's limit less what is in use), or None where it reports none (CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats["bytes_limit"] - stats.get("bytes_in_use", 0) if "bytes_limit" in stats else None


def resolve_num_pages(num_pages: int | None, memory_fraction: float | None, page_bytes: int, max_batch: int,
                      max_pages: int) -> int:
  """The allocatable pages of an engine's cache: `num_pages` when given; else `memory_fraction` of the device's free
  memory (less the trash page); else as many as a contiguous cache of `max_batch` rows of `max_pages` pages, at
  most `DEFAULT_MEMORY_FRACTION` of the free memory where the device reports it."""
  if num_pages is not None:
    return num_pages
  free = _free_bytes()
  if memory_fraction is None:
    contiguous = max_batch * max_pages
    fits = None if free is None else int(DEFAULT_MEMORY_FRACTION * free) // page_bytes - 1
    return contiguous if fits is None else max(1, min(contiguous, fits))
  if free is None:
    raise ValueError("EngineOptions.kv_memory_fraction needs the device's memory statistics, which this device does "
                     "not report; give EngineOptions.num_pages instead")
  pages = int(memory_fraction * free) // page_bytes - 1
  if pages < 1:
    raise ValueError(f"kv_memory_fraction={memory_fraction} of {free} free bytes holds no page of {page_bytes} bytes")
  return pages


class SlotPages:
  """Pages held per slot, the host's page table and the prefix cache of one engine (see the module docstring).

  Args:
    layout: the cache's shape (`PagedLayout`).
    max_batch: slots.
    prefix_caching: whether `claim` looks prompts up and `publish` lists their pages.
  """

  def __init__(self, layout: PagedLayout, max_batch: int, prefix_caching: bool):
    self.layout = layout
    self.prefix_caching = prefix_caching
    self.allocator = PageAllocator(layout.num_pages)
    self.cache = PrefixCache(self.allocator, layout.page_size)
    self.held: list[list[int]] = [[] for _ in range(max_batch)]
    self.table_bp = np.full((max_batch, layout.max_pages), layout.trash_page, np.int32)
    self.dirty = True

  @property
  def used(self) -> int:
    """Pages with a reference (held by a slot or listed in the prefix cache)."""
    return self.layout.num_pages - self.allocator.num_free

  def available(self) -> int:
    """Pages an allocation can get: the free ones and the cached ones no slot holds."""
    return self.allocator.num_free + self.cache.num_evictable()

  def prefix_keys(self, tokens: Sequence[int]) -> list[bytes]:
    """The keys a prompt is looked up by: its full pages but the last token (at least one token is computed, for
    its logits); none without prefix caching."""
    return self.cache.page_keys(tokens[:len(tokens) - 1]) if self.prefix_caching else []

  def cached_tokens(self, keys: Sequence[bytes]) -> int:
    """Tokens of the longest cached run of `keys` (`prefix_keys`). Takes no reference."""
    n = 0
    for key in keys:
      if self.cache.cached_page(key) is None:
        break
      n += 1
    return n * self.layout.page_size

  def claim(self, slot: int, keys: Sequence[bytes], total_tokens: int, reserve: int = 0) -> int | None:
    """Pages for a request entering `slot` whose prompt has the prefix keys `keys` (`prefix_keys`; [] shares
    nothing) and which may hold `total_tokens` tokens by the end of its first rounds: its prompt's cached prefix
    pages, then fresh ones, provided `reserve` more pages stay available. Returns the cached tokens (its prefill
    starts there), or None, changing nothing, when the pages are not there."""
    if self.held[slot]:
      raise ValueError(f"slot {slot} still holds pages {self.held[slot]}")
    shared = self.cache.match_keys(keys) if keys else []
    need = pages_needed(total_tokens, self.layout.page_size) - len(shared)
    if need + reserve > self.available():
      self.allocator.free(shared)
      return None
    self._set(slot, shared + self.cache.allocate(need))
    return len(shared) * self.layout.page_size

  def short_of(self, slot: int, total_tokens: int) -> int:
    """Pages `slot` lacks to hold `total_tokens` tokens (0 when it holds enough)."""
    return max(0, pages_needed(total_tokens, self.layout.page_size) - len(self.held[slot]))

  def grow(self, slot: int, total_tokens: int) -> bool:
    """Pages for `total_tokens` tokens in `slot` (evicting unheld cached pages when needed); False, changing
    nothing, when too few are available."""
    need = pages_needed(total_tokens, self.layout.page_size) - len(self.held[slot])
    if need <= 0:
      return True
    if len(self.held[slot]) + need > self.layout.max_pages:
      raise ValueError(f"slot {slot} would hold {total_tokens} tokens, more than max_pages={self.layout.max_pages} "
                       "pages")
    try:
      fresh = self.cache.allocate(need)
    except OutOfPagesError:
      return False
    self._set(slot, self.held[slot] + fresh)
    return True

  def publish(self, slot: int, tokens: Sequence[int]) -> None:
    """Lists the full pages of `tokens` (the prompt in `slot`, its K/V written) in the prefix cache."""
    if self.prefix_caching:
      self.cache.insert(tokens, self.held[slot])

  def release(self, slot: int) -> None:
    """Drops the slot's references (cached pages stay cached) and points its table row at the trash page."""
    self.allocator.free(self.held[slot])
    self._set(slot, [])

  def _set(self, slot: int, pages: list[int]) -> None:
    if len(pages) > self.layout.max_pages:
      raise ValueError(f"slot {slot} would hold {len(pages)} pages, more than max_pages={self.layout.max_pages}")
    self.held[slot] = pages
    self.table_bp[slot] = self.layout.trash_page
    self.table_bp[slot, :len(pages)] = pages
    self.dirty = True
