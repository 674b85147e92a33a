"""Preallocated, head-major KV cache with per-row lengths.

Row b's valid keys/values live in slots `[0, lengths_b[b])` of every layer (prompts are compacted
to the left at prefill, whatever their padding), so decode writes one slot per row at
`lengths_b[b]` and attention kernels need only the lengths.

Storage (`kv_dtype`): the model's dtype, or 8 bits (`"int8"`, `"float8_e4m3fn"`): then each layer's K and V are a
`QuantizedKV`, the 8-bit values `[B, Hkv, S, D]` and one float32 scale per (row, KV group, slot) `[B, Hkv, S]`
(`pallas_kernels.kv_quant`: computed when a token is written, no calibration). Prefill attends in the model's
dtype and quantises when it writes the cache; decode writes quantise and the decode attention kernels dequantise
in registers: D + 4 bytes per (token, group) instead of 2 D, about half the bytes a decode step reads from the
cache and twice the tokens in the same memory.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import kv_quant
from polar_jax.config import ModelConfig

KV_DTYPES = ("bfloat16", "float16", "float32") + kv_quant.KV8_DTYPES


def storage_dtype(model_dtype, kv_dtype: str | None):
  """The cache's element dtype for a `kv_dtype` choice: None is the model's dtype; a float name must be the model's
  dtype (the attention kernels take q and a float cache of one dtype); "int8" / "float8_e4m3fn" store 8 bits."""
  model_dtype = jnp.dtype(model_dtype)
  if kv_dtype is None:
    return model_dtype
  if kv_dtype not in KV_DTYPES:
    raise ValueError(f"kv_dtype must be one of {KV_DTYPES} or None (the model's dtype), got {kv_dtype!r}")
  dtype = jnp.dtype(kv_dtype)
  if not kv_quant.is_8bit(dtype) and dtype != model_dtype:
    raise ValueError(f"kv_dtype={kv_dtype!r}: a float KV cache is stored in the model's dtype ({model_dtype.name}); "
                     f"pass None, {model_dtype.name!r} or an 8-bit dtype {kv_quant.KV8_DTYPES}")
  return dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKV:
  """One layer's 8-bit K or V cache (`pallas_kernels.kv_quant`), carried where a float cache array is.

  Attributes:
    values: int8 or float8_e4m3fn `[..., S, D]` (`[B, Hkv, S, D]`, or a paged pool `[Hkv, P, page, D]`).
    scale: float32 `[..., S]`, one per stored vector (0 for never-written slots).
  """

  values: jax.Array
  scale: jax.Array

  @classmethod
  def zeros(cls, shape, dtype) -> "QuantizedKV":
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape[:-1], kv_quant.SCALE_DTYPE))

  @property
  def shape(self):
    return self.values.shape

  @property
  def dtype(self):
    return self.values.dtype

  @property
  def ndim(self) -> int:
    return self.values.ndim

  def dequantise(self, dtype) -> jax.Array:
    return kv_quant.dequantise(self.values, self.scale, dtype)


def split(cache) -> tuple[jax.Array, jax.Array | None]:
  """(values, scale) of a `QuantizedKV`; (cache, None) of a float cache array."""
  return (cache.values, cache.scale) if isinstance(cache, QuantizedKV) else (cache, None)


def join(values: jax.Array, scale: jax.Array | None):
  """The inverse of `split`."""
  return values if scale is None else QuantizedKV(values, scale)


def is_quantised(cache) -> bool:
  return isinstance(cache, QuantizedKV)


def read(cache, dtype) -> jax.Array:
  """A float view of a cache (dequantised when 8-bit), e.g. for the chunked prefill's attention."""
  return cache.dequantise(dtype) if isinstance(cache, QuantizedKV) else cache


def update_slice(cache, new_x, index: tuple):
  """`lax.dynamic_update_slice(cache, new_x, index)` for a float cache or a `QuantizedKV` (new_x quantised per
  vector along its last axis, its scales written at `index[:-1]`)."""
  if not isinstance(cache, QuantizedKV):
    return jax.lax.dynamic_update_slice(cache, new_x.astype(cache.dtype), index)
  values, scale = kv_quant.quantise(new_x, cache.dtype)
  return QuantizedKV(jax.lax.dynamic_update_slice(cache.values, values, index),
                     jax.lax.dynamic_update_slice(cache.scale, scale, index[:-1]))


def scatter_set(cache, index: tuple, new_x, **kwargs):
  """`cache.at[index].set(new_x, **kwargs)` for a float cache or a `QuantizedKV` (`index` addresses whole vectors:
  it indexes every axis but the last)."""
  if not isinstance(cache, QuantizedKV):
    return cache.at[index].set(new_x.astype(cache.dtype), **kwargs)
  values, scale = kv_quant.quantise(new_x, cache.dtype)
  return QuantizedKV(cache.values.at[index].set(values, **kwargs), cache.scale.at[index].set(scale, **kwargs))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Per-layer K and V caches `[B, Hkv, S, D]` and the valid length of each row.

  Attributes:
    k_bhsd: one key cache per layer.
    v_bhsd: one value cache per layer.
    lengths_b: int32 `[B]`, number of valid slots in each row (the same for every layer).
  """

  k_bhsd: tuple[jax.Array, ...]
  v_bhsd: tuple[jax.Array, ...]
  lengths_b: jax.Array

  @classmethod
  def init(cls, config: ModelConfig, batch: int, max_len: int, dtype, kv_dtype: str | None = None) -> "KVCache":
    """An empty cache: zeros `[batch, num_kv_heads, max_len, head_dim]` of `dtype` per layer, every row's length 0.

    Args:
      config: the model's `ModelConfig` (layers, KV heads, head_dim).
      batch: rows (sequences decoded together).
      max_len: slots per row: the longest prompt plus the tokens to generate (`polar_jax.generate` sizes it).
      dtype: the model's dtype (`model.dtype`).
      kv_dtype: the storage (`storage_dtype`): None for `dtype`, or "int8" / "float8_e4m3fn" (`QuantizedKV` layers).

    Example:
      cache = KVCache.init(model.config, batch=4, max_len=256, dtype=model.dtype)
      logits_bv, cache = model.prefill(tokens_bt, lengths_b, cache)
    """
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    store = storage_dtype(dtype, kv_dtype)
    zeros = lambda: (QuantizedKV.zeros(shape, store) if kv_quant.is_8bit(store)   # noqa: E731
                     else jnp.zeros(shape, store))
    return cls(k_bhsd=tuple(zeros() for _ in range(config.num_layers)),
               v_bhsd=tuple(zeros() for _ in range(config.num_layers)), lengths_b=jnp.zeros((batch,), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.k_bhsd[0].shape[2]

  @property
  def batch(self) -> int:
    return self.k_bhsd[0].shape[0]

  def layer_kv(self, i: int) -> tuple[jax.Array, jax.Array]:
    return self.k_bhsd[i], self.v_bhsd[i]

  def with_layers(self, ks, vs, lengths_b) -> "KVCache":
    """The cache with new per-layer K and V and lengths (the same method on `PagedKVCache`)."""
    return KVCache(tuple(ks), tuple(vs), lengths_b)

  @property
  def kv_dtype(self):
    """The storage dtype of the cache's values (int8 / float8_e4m3fn for an 8-bit cache)."""
    return self.k_bhsd[0].dtype

  def nbytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves((self.k_bhsd, self.v_bhsd)))


def write_prefill(cache_bhsd, new_bthd: jax.Array, row0=0):
  """Writes compacted prompts' K or V `[R, T, H, D]` into rows `[row0, row0 + R)`, slots `[0, T)` (quantised for
  a `QuantizedKV`)."""
  return update_slice(cache_bhsd, new_bthd.transpose(0, 2, 1, 3), (row0, 0, 0, 0))

