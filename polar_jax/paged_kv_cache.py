"""A paged KV cache for decoding: per layer K/V page pools, a page table and per-row lengths, all on the device.

Row b's token t lives in page `page_table_bp[b, t // page_size]`, slot `t % page_size`, of every KV group's plane of
every layer's pools `[Hkv, num_pages + 1, page_size, D]` (the layout of
`pallas_kernels.selective_paged_decode_attention`). The pools hold one page more than the host's allocator hands out:
the last one, `trash_page`, takes the writes of rows that must not touch real pages (free slots, table entries a row
does not own), and is never read. Which pages hold which tokens is decided on the host (`polar_jax.paged`).

`CausalLM.decode_step` takes this cache where it takes a `KVCache`: each layer writes the new token's K/V into its
page and attends with the paged kernel. An 8-bit cache (`kv_dtype` "int8" / "float8_e4m3fn") holds each pool as a
`polar_jax.kv_cache.QuantizedKV`: 8-bit values and a float32 scale per (group, page, slot) `[Hkv, P + 1, S]`,
written quantised and read by the kernel with its scales.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import kv_quant
from polar_jax import kv_cache
from polar_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class PagedLayout:
  """The shape of a paged cache: `num_pages` allocatable pages of `page_size` tokens, `max_pages` per row."""

  page_size: int
  num_pages: int
  max_pages: int

  def __post_init__(self):
    for name in ("page_size", "num_pages", "max_pages"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"PagedLayout.{name} must be an integer >= 1, got {v!r}")
    if self.page_size % 16:
      raise ValueError(f"PagedLayout.page_size must be a multiple of 16 (the paged kernel's), got {self.page_size}")

  @property
  def trash_page(self) -> int:
    """The pool page that takes writes nobody reads (one past the allocatable pages)."""
    return self.num_pages

  @property
  def max_len(self) -> int:
    return self.max_pages * self.page_size

  def page_bytes(self, config: ModelConfig, dtype, kv_dtype: str | None = None) -> int:
    """Bytes of one page over every layer's K and V pools (`kv_dtype` as `kv_cache.storage_dtype`: an 8-bit page
    holds a float32 scale per token and group beside its values)."""
    store = kv_cache.storage_dtype(dtype, kv_dtype)
    per_vector = config.head_dim * store.itemsize
    if kv_quant.is_8bit(store):
      per_vector += jnp.dtype(kv_quant.SCALE_DTYPE).itemsize
    return 2 * config.num_layers * config.num_kv_heads * self.page_size * per_vector


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
  """Per-layer K and V page pools `[Hkv, num_pages + 1, page_size, D]`, the page table `[B, max_pages]` and the
  valid length of each row.

  Attributes:
    k_hpsd, v_hpsd: one pool per layer.
    page_table_bp: int32, row b's pages in token order (entries past its length: any page, never read).
    lengths_b: int32 `[B]`, tokens cached per row.
  """

  k_hpsd: tuple[jax.Array, ...]
  v_hpsd: tuple[jax.Array, ...]
  page_table_bp: jax.Array
  lengths_b: jax.Array

  @classmethod
  def init(cls, config: ModelConfig, batch: int, layout: PagedLayout, dtype, kv_dtype: str | None = None
           ) -> "PagedKVCache":
    """Zero pools, every table entry the trash page, every length 0. `dtype`: the model's; `kv_dtype`: the storage
    (`kv_cache.storage_dtype`: None for `dtype`, or 8 bits as `QuantizedKV` pools)."""
    shape = (config.num_kv_heads, layout.num_pages + 1, layout.page_size, config.head_dim)
    store = kv_cache.storage_dtype(dtype, kv_dtype)
    pool = lambda: (kv_cache.QuantizedKV.zeros(shape, store) if kv_quant.is_8bit(store)   # noqa: E731
                    else jnp.zeros(shape, store))
    pools = lambda: tuple(pool() for _ in range(config.num_layers))   # noqa: E731
    return cls(pools(), pools(), jnp.full((batch, layout.max_pages), layout.trash_page, jnp.int32),
               jnp.zeros((batch,), jnp.int32))

  @property
  def batch(self) -> int:
    return self.page_table_bp.shape[0]

  @property
  def page_size(self) -> int:
    return self.k_hpsd[0].shape[2]

  @property
  def max_len(self) -> int:
    """Tokens a row can hold (its page-table row's pages)."""
    return self.page_table_bp.shape[1] * self.page_size

  @property
  def trash_page(self) -> int:
    return self.k_hpsd[0].shape[1] - 1

  def layer_kv(self, i: int) -> tuple[jax.Array, jax.Array]:
    return self.k_hpsd[i], self.v_hpsd[i]

  def with_layers(self, ks, vs, lengths_b) -> "PagedKVCache":
    return PagedKVCache(tuple(ks), tuple(vs), self.page_table_bp, lengths_b)

  @property
  def kv_dtype(self):
    """The storage dtype of the pools' values (int8 / float8_e4m3fn for an 8-bit cache)."""
    return self.k_hpsd[0].dtype

  def nbytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves((self.k_hpsd, self.v_hpsd)))


def write_token(pages_hpsd, new_bhd: jax.Array, page_table_bp: jax.Array, lengths_b: jax.Array):
  """Writes each row's new K or V `[B, Hkv, D]` at position `lengths_b[b]` (every KV group's plane; quantised into
  an 8-bit `QuantizedKV` pool)."""
  s = pages_hpsd.shape[2]
  slot_b = jnp.minimum(lengths_b // s, page_table_bp.shape[1] - 1)
  page_b = jnp.take_along_axis(page_table_bp, slot_b[:, None], axis=1)[:, 0]
  return kv_cache.scatter_set(pages_hpsd, (slice(None), page_b, lengths_b % s), new_bhd.transpose(1, 0, 2))


def write_tokens(pages_hpsd, new_htd: jax.Array, table_p: jax.Array, start, n_valid):
  """Writes one row's K or V `[Hkv, T, D]` at positions `start + [0, n_valid)` through its page table `[max_pages]`
  (quantised into an 8-bit pool); the T - n_valid padding positions are dropped."""
  t = new_htd.shape[1]
  s = pages_hpsd.shape[2]
  pos_t = start + jnp.arange(t)
  page_t = table_p[jnp.minimum(pos_t // s, table_p.shape[0] - 1)]
  page_t = jnp.where(jnp.arange(t) < n_valid, page_t, pages_hpsd.shape[1])   # out of range: dropped
  return kv_cache.scatter_set(pages_hpsd, (slice(None), page_t, pos_t % s), new_htd, mode="drop")


def gather_row(pages_hpsd, table_p: jax.Array, dtype=None) -> jax.Array:
  """One row's keys or values as a contiguous `[Hkv, max_pages * page_size, D]` (positions past the row's length
  hold whatever their pages hold); an 8-bit pool's dequantised to `dtype`."""
  hkv, _, s, d = pages_hpsd.shape
  row = jax.tree_util.tree_map(lambda x: x[:, table_p], pages_hpsd)
  return kv_cache.read(row, dtype).reshape(hkv, table_p.shape[0] * s, d)


def masked_table(cache: PagedKVCache, keep_b: jax.Array) -> PagedKVCache:
  """`cache` with the table rows of rows not in `keep_b` pointing at the trash page (their writes land there)."""
  table = jnp.where(keep_b[:, None], cache.page_table_bp, cache.trash_page)
  return dataclasses.replace(cache, page_table_bp=table)
