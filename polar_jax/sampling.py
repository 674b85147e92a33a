"""Token samplers: small frozen dataclasses that are also JAX pytrees.

Their numeric fields are pytree leaves, so changing a temperature or a per-row `k` does not
recompile; their structure (which classes, in which order) is static. Fields take a scalar or
one value per row. Compose logit filters with `|`:

    sampler = TopK(50) | TopP(0.9) | Temperature(0.7)

A chain applies its parts left to right to the logits, then samples from the result (or takes
the argmax if it contains `Greedy()`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


def _register(cls):
  fields = [f.name for f in dataclasses.fields(cls)]
  return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


class Sampler:
  """Base class: `process(logits_bv) -> logits_bv`; `__call__(logits_bv, key) -> tokens_b`."""

  greedy = False

  def process(self, logits_bv: jax.Array) -> jax.Array:
    return logits_bv

  def __call__(self, logits_bv: jax.Array, key: jax.Array) -> jax.Array:
    return Chain((self,))(logits_bv, key)

  def __or__(self, other: "Sampler") -> "Chain":
    left = self.parts if isinstance(self, Chain) else (self,)
    right = other.parts if isinstance(other, Chain) else (other,)
    return Chain(left + right)

  def per_row(self, batch: int) -> "Sampler":
    """The same sampler with every field broadcast to `[batch]` float32/int32 arrays."""
    def fix(x, dtype):
      a = jnp.asarray(x, dtype)
      if a.ndim == 0:
        return jnp.full((batch,), a)
      if a.shape != (batch,):
        raise ValueError(f"{type(self).__name__}: per-row values need shape ({batch},), got {a.shape}")
      return a
    kwargs = {}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      kwargs[f.name] = v.per_row(batch) if isinstance(v, Sampler) else (
          tuple(p.per_row(batch) for p in v) if isinstance(v, tuple) else fix(v, _FIELD_DTYPES[f.name]))
    return type(self)(**kwargs)

  def validate(self) -> None:
    """Raises ValueError for out-of-range concrete values."""


_FIELD_DTYPES: dict[str, Any] = {"temperature": jnp.float32, "k": jnp.int32, "p": jnp.float32}


@_register
@dataclasses.dataclass(frozen=True)
class Greedy(Sampler):
  """Argmax."""

  greedy = True


@_register
@dataclasses.dataclass(frozen=True)
class Temperature(Sampler):
  """Divides logits by `temperature` (> 0)."""

  temperature: Any = 1.0

  def process(self, logits_bv):
    t = jnp.asarray(self.temperature, jnp.float32)
    return logits_bv / (t[:, None] if t.ndim else t)

  def validate(self):
    if not isinstance(self.temperature, jax.core.Tracer) and jnp.any(jnp.asarray(self.temperature) <= 0):
      raise ValueError(f"temperature must be > 0, got {self.temperature}")


@_register
@dataclasses.dataclass(frozen=True)
class TopK(Sampler):
  """Keeps the `k` largest logits of each row (ties at the k-th value are kept)."""

  k: Any = 50

  def process(self, logits_bv):
    k = jnp.asarray(self.k, jnp.int32)
    k = jnp.broadcast_to(k, logits_bv.shape[:1])
    k = jnp.clip(k, 1, logits_bv.shape[-1])
    sorted_desc = -jnp.sort(-logits_bv, axis=-1)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    return jnp.where(logits_bv >= kth, logits_bv, -jnp.inf)

  def validate(self):
    if not isinstance(self.k, jax.core.Tracer) and jnp.any(jnp.asarray(self.k) < 1):
      raise ValueError(f"top-k needs k >= 1, got {self.k}")


@_register
@dataclasses.dataclass(frozen=True)
class TopP(Sampler):
  """Nucleus filtering: keeps the smallest set of tokens whose probability reaches `p` (0 < p <= 1)."""

  p: Any = 0.9

  def process(self, logits_bv):
    p = jnp.broadcast_to(jnp.asarray(self.p, jnp.float32), logits_bv.shape[:1])
    sorted_desc = -jnp.sort(-logits_bv, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs          # mass strictly above each sorted token
    keep = before < p[:, None]
    n_keep = jnp.maximum(keep.sum(axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(logits_bv >= threshold, logits_bv, -jnp.inf)

  def validate(self):
    if not isinstance(self.p, jax.core.Tracer):
      p = jnp.asarray(self.p)
      if jnp.any(p <= 0) or jnp.any(p > 1):
        raise ValueError(f"top-p needs 0 < p <= 1, got {self.p}")


@_register
@dataclasses.dataclass(frozen=True)
class Chain(Sampler):
  """Applies `parts` in order, then samples (argmax if any part is Greedy)."""

  parts: tuple = ()

  def __call__(self, logits_bv, key):
    logits = logits_bv.astype(jnp.float32)
    for part in self.parts:
      logits = part.process(logits)
    if any(p.greedy for p in self.parts) or not self.parts:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

  def validate(self):
    for p in self.parts:
      p.validate()
