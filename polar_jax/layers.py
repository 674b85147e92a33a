"""Small Flax NNX building blocks: Linear, RMSNorm, LayerNorm, Embedding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels

_INIT_STD = 0.02


def _next_key(rngs: nnx.Rngs) -> jax.Array:
  """`rngs.params()`: the same key, the stream's count advanced by `set_value` rather than `count[...] += 1`, whose
  sharding check on a tracer walks the whole trace so far (model construction under `nnx.eval_shape` / `nnx.jit`
  became quadratic in the layers: 3 of the 4.7 s of a 30-layer `abstract_model`)."""
  stream = rngs.params
  count = stream.count.get_value()
  key = jax.random.fold_in(stream.key.get_value(), count)
  stream.count.set_value(count + 1)
  return key


def _normal(rngs: nnx.Rngs, shape, dtype) -> jax.Array:
  return (_INIT_STD * jax.random.normal(_next_key(rngs), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
  """`y = x @ kernel + bias` with `kernel [in, out]`; float32 accumulation, x's dtype out."""

  def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, rngs: nnx.Rngs | None = None,
               values: tuple[jax.Array, jax.Array | None] | None = None):
    """`values=(kernel, bias or None)`: take these arrays (shapes checked) instead of a random init."""
    if values is None:
      self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), dtype))
      self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None
      return
    kernel, bias_value = values
    if tuple(kernel.shape) != (in_features, out_features) or (bias_value is None) == bias or (
        bias_value is not None and tuple(bias_value.shape) != (out_features,)):
      raise ValueError(f"Linear({in_features}, {out_features}, bias={bias}) given kernel {tuple(kernel.shape)} and "
                       f"bias {None if bias_value is None else tuple(bias_value.shape)}")
    self.kernel = nnx.Param(kernel)
    self.bias = nnx.Param(bias_value) if bias else None

  def __call__(self, x: jax.Array, out_dtype=None, *, residual: jax.Array | None = None) -> jax.Array:
    """XLA's dot; with `residual`, `residual + y` in the output dtype."""
    kernel = self.kernel[...]
    y = jnp.dot(x.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    y = y.astype(out_dtype or kernel.dtype)
    return y if residual is None else residual + y

  def decode(self, x_md: jax.Array, out_dtype=None, *, residual: jax.Array | None = None,
             side: pallas_kernels.Side | None = None, glu: str | None = None, counters=None,
             emit_counters: bool = False, rms: pallas_kernels.RmsInput | None = None, norm_scale=None,
             implementation: str | None = None) -> pallas_kernels.MatmulOut:
    """The decode step's projection of a few rows `[M, in]`: `pallas_kernels.skinny_matmul` (one kernel that
    streams the weight once and adds the bias and the residual in its epilogue; the XLA reference off GPU).
    Same values as `__call__` up to float32 summation order; the result's `y` is the projection.
    `side`: also the float32 product of a second narrow weight (a head router) from extra programs of the kernel,
    or its per-row top-k (`Side.topk`). `glu="silu"`: the columns are (gate, up) pairs (a fused gate|up
    projection) and y is `silu(gate) * up`, half as wide, from the float32 sums. `emit_counters` / `counters`:
    zeroed split-K counters handed from one kernel to the next. `rms` / `norm_scale=g`: the deferred RMSNorm
    (`DecodeOptions.deferred_norm`): x's rows are `h * g`, normalised in the epilogue by h's squares / the result
    also holds `y * g` and y's squares for the next such call."""
    bias = None if self.bias is None else self.bias[...]
    kernel = self.kernel[...]
    out_dtype = out_dtype or kernel.dtype
    if residual is not None:
      residual = residual.astype(out_dtype)
    return pallas_kernels.skinny_matmul(x_md, kernel, bias, residual, out_dtype=out_dtype, side=side, glu=glu,
                                        rms=rms, norm_scale_N=norm_scale, counters_C=counters,
                                        emit_counters=emit_counters, implementation=implementation)


class RMSNorm(nnx.Module):
  """`x / rms(x) * scale`, computed in float32 (as Hugging Face LLaMA)."""

  def __init__(self, dim: int, *, eps: float, dtype, rngs: nnx.Rngs):
    del rngs
    self.scale = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...]
    return (scale.astype(jnp.float32) * y.astype(x.dtype).astype(jnp.float32)).astype(scale.dtype)


class LayerNorm(nnx.Module):
  """Standard LayerNorm with scale and bias, computed in float32."""

  def __init__(self, dim: int, *, eps: float, dtype, rngs: nnx.Rngs):
    del rngs
    self.scale = nnx.Param(jnp.ones((dim,), dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    scale = self.scale[...]
    return (y * scale.astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(scale.dtype)


def make_norm(kind: str, dim: int, *, eps: float, dtype, rngs: nnx.Rngs) -> nnx.Module:
  if kind == "rms":
    return RMSNorm(dim, eps=eps, dtype=dtype, rngs=rngs)
  return LayerNorm(dim, eps=eps, dtype=dtype, rngs=rngs)


class Embedding(nnx.Module):
  """Lookup table `embedding [num, dim]`; `attend` gives float32 logits against it (tied lm_head)."""

  def __init__(self, num: int, dim: int, *, dtype, rngs: nnx.Rngs):
    self.embedding = nnx.Param(_normal(rngs, (num, dim), dtype))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0, mode="clip")

  def attend(self, x: jax.Array) -> jax.Array:
    table = self.embedding[...]
    return jnp.einsum("...d,vd->...v", x.astype(table.dtype), table, preferred_element_type=jnp.float32)
