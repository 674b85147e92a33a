"""Preallocated, head-major KV cache with per-row lengths.

Row b's valid keys/values live in slots `[0, lengths_b[b])` of every layer (prompts are compacted
to the left at prefill, whatever their padding), so decode writes one slot per row at
`lengths_b[b]` and attention kernels need only the lengths.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from polar_jax.config import ModelConfig


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
  def init(cls, config: ModelConfig, batch: int, max_len: int, dtype) -> "KVCache":
    """An empty cache: zeros `[batch, num_kv_heads, max_len, head_dim]` of `dtype` per layer, every row's length 0.

    Args:
      config: the model's `ModelConfig` (layers, KV heads, head_dim).
      batch: rows (sequences decoded together).
      max_len: slots per row: the longest prompt plus the tokens to generate (`polar_jax.generate` sizes it).
      dtype: the cache dtype, normally the model's (`model.dtype`).

    Example:
      cache = KVCache.init(model.config, batch=4, max_len=256, dtype=model.dtype)
      logits_bv, cache = model.prefill(tokens_bt, lengths_b, cache)
    """
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return cls(k_bhsd=zeros, v_bhsd=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
               lengths_b=jnp.zeros((batch,), jnp.int32))

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

  def nbytes(self) -> int:
    return sum(x.size * x.dtype.itemsize for x in self.k_bhsd + self.v_bhsd)


def write_prefill(cache_bhsd: jax.Array, new_bthd: jax.Array, row0=0) -> jax.Array:
  """Writes compacted prompts' K or V `[R, T, H, D]` into rows `[row0, row0 + R)`, slots `[0, T)`."""
  return jax.lax.dynamic_update_slice(cache_bhsd, new_bthd.transpose(0, 2, 1, 3).astype(cache_bhsd.dtype),
                                      (row0, 0, 0, 0))

