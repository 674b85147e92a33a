"""Rotary position embeddings, rotate-half convention (as Hugging Face), so HF q/k need no permutation."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from polar_jax.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
  """Per-pair inverse frequencies `[D // 2]` (float32), with "linear" or "llama3" scaling applied."""
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  s = config.rope_scaling
  if s is None or s.rope_type == "default":
    return inv_freq.astype(np.float32)
  if s.rope_type == "linear":
    return (inv_freq / s.factor).astype(np.float32)
  # llama3: long wavelengths divided by `factor`, short ones kept, smooth blend in between.
  old_len = s.original_max_position_embeddings
  low_wavelen = old_len / s.low_freq_factor
  high_wavelen = old_len / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos/sin tables `[*positions.shape, D]` (float32) for integer positions."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """Rotates `x [..., H, D]` with `cos/sin [..., D]` (broadcast over heads); float32 math, x's dtype out."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  out = xf * cos[..., None, :] + rotated * sin[..., None, :]
  return out.astype(x.dtype)
