"""polar_jax.paged: page allocation, reference-counted sharing, exhaustion, chained page keys, prefix matching and
least-recently-used eviction."""
import pytest

from polar_jax.paged import OutOfPagesError
from polar_jax.paged import PageAllocator
from polar_jax.paged import PrefixCache
from polar_jax.paged import page_key
from polar_jax.paged import pages_needed

PAGE = 4


def _tokens(*pages):
  """Tokens made of whole pages, each page given as one fill value: _tokens(1, 2) = [1]*4 + [2]*4."""
  return [t for value in pages for t in [value] * PAGE]


def test_pages_needed():
  assert [pages_needed(n, 16) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]
  assert pages_needed(list(range(37)), 16) == 3
  with pytest.raises(ValueError, match="page_size"):
    pages_needed(5, 0)
  with pytest.raises(ValueError, match="token count"):
    pages_needed(-1, 16)


def test_allocate_and_free():
  alloc = PageAllocator(5)
  first = alloc.allocate(3)
  assert first == [0, 1, 2] and alloc.num_free == 2
  assert all(alloc.refcount(p) == 1 for p in first) and alloc.refcount(3) == 0
  alloc.free([1])
  assert alloc.refcount(1) == 0 and alloc.num_free == 3
  again = alloc.allocate(3)
  assert sorted(again) == [1, 3, 4] and len(set(again + [0, 2])) == 5   # never a page held by someone else
  assert alloc.allocate(0) == []


def test_exhaustion_allocates_nothing():
  alloc = PageAllocator(3)
  alloc.allocate(2)
  with pytest.raises(OutOfPagesError, match="2 pages requested, 1 of 3 free"):
    alloc.allocate(2)
  assert alloc.num_free == 1 and alloc.allocate(1) == [2]
  with pytest.raises(OutOfPagesError):
    alloc.allocate(1)


def test_sharing_by_reference_count():
  alloc = PageAllocator(4)
  (page,) = alloc.allocate(1)
  alloc.retain([page])
  assert alloc.refcount(page) == 2
  alloc.free([page])
  assert alloc.refcount(page) == 1 and alloc.num_free == 3   # still held by the other sequence
  alloc.free([page])
  assert alloc.refcount(page) == 0 and alloc.num_free == 4


def test_bad_frees_and_retains_raise():
  alloc = PageAllocator(4)
  pages = alloc.allocate(2)
  with pytest.raises(ValueError, match="page 3 has 0 references"):
    alloc.free([pages[0], 3])
  assert alloc.refcount(pages[0]) == 1          # nothing changed
  with pytest.raises(ValueError, match="has 1 references, cannot free 2"):
    alloc.free([pages[1], pages[1]])
  with pytest.raises(ValueError, match="outside \\[0, 4\\)"):
    alloc.free([7])
  with pytest.raises(ValueError, match="page 2 is free"):
    alloc.retain([2])
  with pytest.raises(ValueError, match="num_pages"):
    PageAllocator(0)


def test_page_keys_chain():
  cache = PrefixCache(PageAllocator(4), PAGE)
  a = cache.page_keys(_tokens(1, 2, 3))
  b = cache.page_keys(_tokens(9, 2, 3))
  assert len(a) == 3 and len(set(a)) == 3
  assert all(x != y for x, y in zip(a, b))           # same page tokens after a different prefix: other keys
  assert cache.page_keys(_tokens(1, 2, 3) + [5, 6]) == a   # a partial last page has no key
  assert cache.page_keys(_tokens(1, 2)) == a[:2]           # a key names its prefix, not what follows
  assert a[0] == page_key(b"", [1] * PAGE) and a[1] == page_key(a[0], [2] * PAGE)
  assert page_key(b"", [1, 2, 3, 4]) != page_key(b"", [1, 2, 4, 3]) != page_key(b"", [1, 2, 3])
  assert cache.page_keys([1, 2, 3]) == []


def test_match_shares_cached_prefix():
  alloc = PageAllocator(8)
  cache = PrefixCache(alloc, PAGE)
  seq_a = _tokens(1, 2) + [3, 3]                       # two full pages and a partial one
  pages_a = cache.allocate(pages_needed(seq_a, PAGE))
  cache.insert(seq_a, pages_a)
  assert len(cache) == 2 and [alloc.refcount(p) for p in pages_a] == [2, 2, 1]   # the partial page: not cached
  hit = cache.match(_tokens(1, 2, 7))
  assert hit == pages_a[:2] and [alloc.refcount(p) for p in hit] == [3, 3]
  assert cache.match(_tokens(1, 5)) == pages_a[:1]                 # diverges in the second page
  assert cache.match(_tokens(9, 2)) == []                          # same second page after another first page
  assert cache.cached_page(cache.page_keys(_tokens(1))[0]) == pages_a[0]
  # A second sequence that wrote the same prefix into its own pages: the cache keeps the first copy.
  own = cache.allocate(2)
  cache.insert(_tokens(1, 2), own)
  assert len(cache) == 2 and [alloc.refcount(p) for p in own] == [1, 1]
  with pytest.raises(ValueError, match="only 1 pages were given"):
    cache.insert(_tokens(4, 4), own[:1])
  with pytest.raises(ValueError, match="already cached for other tokens"):
    cache.insert(_tokens(8), [pages_a[0]])


def _run_sequence(cache, tokens):
  """A finished sequence: its cached prefix matched, the rest allocated, its full pages cached, all released."""
  pages = cache.match(tokens)
  pages += cache.allocate(pages_needed(tokens, PAGE) - len(pages))
  cache.insert(tokens, pages)
  cache.allocator.free(pages)
  return pages


def test_eviction_least_recently_used_first():
  alloc = PageAllocator(4)
  cache = PrefixCache(alloc, PAGE)
  pages_a = _run_sequence(cache, _tokens(1, 2))
  pages_b = _run_sequence(cache, _tokens(3, 4))
  assert alloc.num_free == 0 and cache.num_evictable() == 4
  cache.allocator.free(cache.match(_tokens(1, 2)))     # A used again: B is now the least recent
  new = cache.allocate(1)
  assert new == [pages_b[1]]                           # B's last page first: its first page keys the rest
  assert cache.match(_tokens(3, 4)) == pages_b[:1]
  alloc.free(pages_b[:1])
  alloc.free(new)
  # B's first page was just matched: now A's pages are the least recent (its last page first).
  assert sorted(cache.allocate(2)) == sorted([pages_b[1], pages_a[1]])   # the one free page, then A's last
  assert len(cache) == 2
  assert cache.match(_tokens(1, 2)) == pages_a[:1] and cache.match(_tokens(3, 4)) == pages_b[:1]


def test_held_pages_are_never_evicted():
  alloc = PageAllocator(3)
  cache = PrefixCache(alloc, PAGE)
  held = cache.match(_tokens(1)) + cache.allocate(1)
  cache.insert(_tokens(1), held)                        # cached and still held by the sequence
  _run_sequence(cache, _tokens(5))                      # cached, unheld
  assert alloc.num_free == 1 and cache.num_evictable() == 1
  with pytest.raises(OutOfPagesError, match="3 pages requested, 1 free and 1 evictable"):
    cache.allocate(3)
  assert len(cache) == 2                                # a failed allocation evicts nothing
  got = cache.allocate(2)
  assert held[0] not in got and cache.match(_tokens(1)) == held and cache.match(_tokens(5)) == []
