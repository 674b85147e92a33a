"""Host-side bookkeeping of a paged KV cache: a page allocator with reference counts and a prefix cache.

The device side is `pallas_kernels.selective_paged_decode_attention`: per layer, K/V page pools
`[Hkv, num_pages, page_size, D]` and a page table `[B, max_pages]` of page indices. These classes decide which
pages hold which tokens; they are pure Python and touch no device array.

- `PageAllocator`: pages `0 .. num_pages - 1`, each free or held by one or more references. A page returns to the
  free list when its last reference is released, so several sequences can share one page.
- `PrefixCache`: full pages of tokens stay reusable after the sequences that wrote them finish. A page's key is a
  hash of its tokens chained with the key of the page before it (as vLLM's block hashes), so a key names the whole
  prefix up to the end of that page: the same page of tokens after a different prefix gets a different key. The
  cache holds one reference on every page it lists; a cached page that no sequence holds is evictable, and
  `PrefixCache.allocate` evicts the least recently used of those when the free pages run out.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import struct
from typing import Iterable, Iterator, Sequence


class OutOfPagesError(RuntimeError):
  """Raised when an allocation asks for more pages than are free (or evictable)."""


def pages_needed(tokens: int | Sequence[int], page_size: int) -> int:
  """Pages that hold `tokens` (a token count or the tokens themselves): ceil(len / page_size)."""
  if page_size < 1:
    raise ValueError(f"page_size must be >= 1, got {page_size}")
  count = tokens if isinstance(tokens, int) else len(tokens)
  if count < 0:
    raise ValueError(f"the token count must be >= 0, got {count}")
  return -(-count // page_size)


class PageAllocator:
  """Pages `0 .. num_pages - 1` with reference counts.

  `allocate` hands out free pages (lowest index first at the start, then in the order they were freed), each with
  one reference; `retain` adds references to held pages (sharing); `free` drops one reference per page and returns
  a page to the free list when its count reaches 0.
  """

  def __init__(self, num_pages: int):
    if num_pages < 1:
      raise ValueError(f"num_pages must be >= 1, got {num_pages}")
    self.num_pages = num_pages
    self._free = collections.deque(range(num_pages))
    self._refcount = [0] * num_pages

  @property
  def num_free(self) -> int:
    return len(self._free)

  def refcount(self, page: int) -> int:
    self._check_page(page)
    return self._refcount[page]

  def allocate(self, n: int = 1) -> list[int]:
    """`n` free pages, one reference each. Raises `OutOfPagesError` (allocating nothing) when fewer are free."""
    if n < 0:
      raise ValueError(f"cannot allocate {n} pages")
    if n > len(self._free):
      raise OutOfPagesError(f"{n} pages requested, {len(self._free)} of {self.num_pages} free")
    pages = [self._free.popleft() for _ in range(n)]
    for page in pages:
      self._refcount[page] = 1
    return pages

  def retain(self, pages: Iterable[int]) -> None:
    """One more reference on each of `pages` (each must be held)."""
    pages = list(pages)
    for page in pages:
      self._check_held(page)
    for page in pages:
      self._refcount[page] += 1

  def free(self, pages: Iterable[int]) -> None:
    """Drops one reference per entry of `pages` (a page listed twice drops two); a page whose count reaches 0
    becomes free. Raises ValueError, changing nothing, when a page would drop below 0 references."""
    drops = collections.Counter(pages)
    for page, count in drops.items():
      self._check_page(page)
      if count > self._refcount[page]:
        raise ValueError(f"page {page} has {self._refcount[page]} references, cannot free {count}")
    for page, count in drops.items():
      self._refcount[page] -= count
      if self._refcount[page] == 0:
        self._free.append(page)

  def _check_page(self, page: int) -> None:
    if not 0 <= page < self.num_pages:
      raise ValueError(f"page {page} is outside [0, {self.num_pages})")

  def _check_held(self, page: int) -> None:
    self._check_page(page)
    if self._refcount[page] == 0:
      raise ValueError(f"page {page} is free: it has no reference to share")


def page_key(parent: bytes, page_tokens: Sequence[int]) -> bytes:
  """The key of one full page: SHA-256 of the previous page's key (`parent`; b"" for the first page) and the
  page's tokens as little-endian 64-bit integers."""
  digest = hashlib.sha256(parent)
  digest.update(len(page_tokens).to_bytes(4, "little"))
  digest.update(struct.pack(f"<{len(page_tokens)}q", *page_tokens))
  return digest.digest()


class PrefixCache:
  """Full pages of token prefixes, shared by reference count and evicted least recently used.

  Usage for one sequence: `pages = cache.match(tokens)` (the cached full pages of its longest cached prefix, each
  with a reference for the caller), then `cache.allocate(n)` for the rest, and after writing the K/V
  `cache.insert(tokens, all_pages)` so later sequences find its full pages; when the sequence ends,
  `cache.allocator.free(all_pages)`. Its full pages stay cached (the cache's own reference) until evicted.
  """

  def __init__(self, allocator: PageAllocator, page_size: int):
    if page_size < 1:
      raise ValueError(f"page_size must be >= 1, got {page_size}")
    self.allocator = allocator
    self.page_size = page_size
    self._page_of_key: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # least recent first
    self._key_of_page: dict[int, bytes] = {}

  def __len__(self) -> int:
    return len(self._page_of_key)

  def page_keys(self, tokens: Sequence[int]) -> list[bytes]:
    """The chained keys of the full pages of `tokens` (a partial last page has none)."""
    keys, parent = [], b""
    for start in range(0, len(tokens) - self.page_size + 1, self.page_size):
      parent = page_key(parent, tokens[start:start + self.page_size])
      keys.append(parent)
    return keys

  def cached_page(self, key: bytes) -> int | None:
    """The page cached under `key`, or None (no reference taken, recency unchanged)."""
    return self._page_of_key.get(key)

  def match(self, tokens: Sequence[int]) -> list[int]:
    """The cached pages of the longest cached prefix of whole pages of `tokens`, in order, each with one more
    reference (the caller's, to free when done). They become the most recently used, the first page most."""
    return self.match_keys(self.page_keys(tokens))

  def match_keys(self, keys: Sequence[bytes]) -> list[int]:
    """`match` for the page keys of the tokens (`page_keys`), already computed."""
    pages = []
    for key in keys:
      page = self._page_of_key.get(key)
      if page is None:
        break
      pages.append(page)
    self.allocator.retain(pages)
    self._touch(self._key_of_page[page] for page in pages)
    return pages

  def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> None:
    """Lists the full pages of `tokens` (page i holds tokens [i * page_size, (i + 1) * page_size)); `pages` must
    hold at least those pages and be held by the caller. A key already cached under another page keeps that page
    (the caller's copy stays the caller's only); each newly listed page gets the cache's reference."""
    keys = self.page_keys(tokens)
    if len(pages) < len(keys):
      raise ValueError(f"{len(tokens)} tokens fill {len(keys)} pages, but only {len(pages)} pages were given")
    for key, page in zip(keys, pages):
      if self._page_of_key.get(key, page) != page:
        continue
      listed = self._key_of_page.get(page)
      if listed is not None and listed != key:
        raise ValueError(f"page {page} is already cached for other tokens")
      if listed is None:
        self.allocator.retain([page])
        self._page_of_key[key] = page
        self._key_of_page[page] = key
    self._touch(key for key, page in zip(keys, pages) if self._page_of_key[key] == page)

  def _unheld_keys(self) -> Iterator[bytes]:
    """Keys of the cached pages that no sequence holds (only the cache's reference), least recently used first."""
    return (key for key, page in self._page_of_key.items() if self.allocator.refcount(page) == 1)

  def num_evictable(self, limit: int | None = None) -> int:
    """Cached pages that no sequence holds, counted up to `limit` (all of them when None)."""
    return sum(1 for _ in itertools.islice(self._unheld_keys(), limit))

  def evict(self, n: int) -> int:
    """Drops up to `n` cached pages that no sequence holds, least recently used first; returns how many."""
    victims = list(itertools.islice(self._unheld_keys(), n))
    for key in victims:
      page = self._page_of_key.pop(key)
      del self._key_of_page[page]
      self.allocator.free([page])
    return len(victims)

  def allocate(self, n: int = 1) -> list[int]:
    """`n` pages from the allocator, evicting least recently used unheld cached pages when too few are free.
    Raises `OutOfPagesError`, evicting nothing, when free plus evictable pages are fewer than `n`."""
    short = n - self.allocator.num_free
    if short > 0:
      if self.num_evictable(short) < short:
        raise OutOfPagesError(f"{n} pages requested, {self.allocator.num_free} free and {self.num_evictable()} "
                              f"evictable of {self.allocator.num_pages}")
      self.evict(short)
    return self.allocator.allocate(n)

  def _touch(self, keys: Iterable[bytes]) -> None:
    # Most recent last; a sequence's pages are touched last-page first, so its first page (the one its other
    # pages' keys chain from) is evicted last.
    for key in reversed(list(keys)):
      self._page_of_key.move_to_end(key)
