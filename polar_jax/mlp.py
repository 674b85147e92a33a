"""MLP blocks: gated (LLaMA family) and ReLU fc1/fc2 (OPT, the one Polar Sparsity's neuron routers target)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from polar_jax.config import ModelConfig
from polar_jax.fusion import split_gate_up
from polar_jax.layers import Linear, _normal

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


class GatedMLP(nnx.Module):
  """`down(act(gate(x)) * up(x))`, the Llama / Mistral / Qwen2 MLP (gate and up one matmul after
  `polar_jax.fusion`).

  Args:
    config: the model's `ModelConfig` (hidden_size, intermediate_size, activation).
    dtype: parameter dtype.
    rngs: `nnx.Rngs` for the random initial weights.

  Call it on `[..., d]`; `decode` is the decode step's path through the Pallas projection kernels.
  """

  def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = Linear(d, f, bias=False, dtype=dtype, rngs=rngs)
    self.up_proj = Linear(d, f, bias=False, dtype=dtype, rngs=rngs)
    self.down_proj = Linear(f, d, bias=False, dtype=dtype, rngs=rngs)
    self.gate_up_proj = nnx.data(None)   # columns [neuron n: gate, up] after `polar_jax.fusion.fuse_projections`
    self.activation = config.activation

  def __call__(self, x):
    act = ACTIVATIONS[self.activation]
    if self.gate_up_proj is not None:
      gate, up = split_gate_up(self.gate_up_proj(x, jnp.float32))
    else:
      gate, up = self.gate_proj(x, jnp.float32), self.up_proj(x, jnp.float32)
    h = act(gate) * up
    return self.down_proj(h.astype(x.dtype))

  decodes_in_kernels = True   # `decode` always runs (the layer's residual add in down_proj's epilogue)

  @property
  def glu_epilogue(self) -> bool:
    """Whether `decode` runs act(gate) * up in the fused gate|up kernel's epilogue (then it takes `rms=`)."""
    return self.gate_up_proj is not None and self.activation in pallas_kernels.GLU_ACTIVATIONS

  def decode(self, x_md, *, residual_md=None, rms: pallas_kernels.RmsInput | None = None, norm_scale=None,
             implementation=None) -> pallas_kernels.MatmulOut:
    """The decode step's MLP of a few rows `[M, d]` with `Linear.decode` projections (fused or not); with
    `residual_md`, the result's y is `residual_md + mlp(x)` (added in down_proj's epilogue). `rms` / `norm_scale`:
    the deferred RMSNorm (`Linear.decode`; `rms` needs `glu_epilogue`): x is `h * g` normalised in the gate|up
    kernel / the result also holds `y * norm_scale` and y's squares."""
    counters = None
    if rms is not None and not self.glu_epilogue:
      raise ValueError("GatedMLP.decode: rms= needs the fused gate|up kernel with the activation in its epilogue")
    if self.glu_epilogue:
      # act(gate) * up in the gate|up kernel's epilogue: the [M, 2F] float32 product is never written; zeroed
      # split-K counters handed on to down_proj
      out = self.gate_up_proj.decode(x_md, x_md.dtype, glu=self.activation, emit_counters=True, rms=rms,
                                     implementation=implementation)
      h, counters = out.y, out.counters
    else:
      kw = dict(implementation=implementation)
      if self.gate_up_proj is not None:
        gate, up = split_gate_up(self.gate_up_proj.decode(x_md, jnp.float32, **kw).y)
      else:
        gate, up = self.gate_proj.decode(x_md, jnp.float32, **kw).y, self.up_proj.decode(x_md, jnp.float32, **kw).y
      h = (ACTIVATIONS[self.activation](gate) * up).astype(x_md.dtype)
    return self.down_proj.decode(h, residual=residual_md, counters=counters, norm_scale=norm_scale,
                                 implementation=implementation)


class NeuronMLP(nnx.Module):
  """`fc2(act(fc1(x)))` with one row per neuron in both weights, so neurons can be gathered: the OPT (ReLU) MLP that
  Polar Sparsity's neuron routers sparsify (`sparse` runs only a selected set of neurons).

  Args:
    config: the model's `ModelConfig` (hidden_size, intermediate_size, activation, mlp_bias).
    dtype: parameter dtype.
    rngs: `nnx.Rngs` for the random initial weights.

  Attributes:
    w_in_nd: `[N, d]` fc1 weight (HF `fc1.weight`).
    b_in_n: `[N]` fc1 bias or None.
    w_out_nd: `[N, d]` fc2 weight transposed (HF `fc2.weight.T`).
    b_out_d: `[d]` fc2 bias or None.
  """

  def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
    d, n = config.hidden_size, config.intermediate_size
    self.w_in_nd = nnx.Param(_normal(rngs, (n, d), dtype))
    self.w_out_nd = nnx.Param(_normal(rngs, (n, d), dtype))
    self.b_in_n = nnx.Param(jnp.zeros((n,), dtype)) if config.mlp_bias else None
    self.b_out_d = nnx.Param(jnp.zeros((d,), dtype)) if config.mlp_bias else None
    self.activation = config.activation

  def pre_activation(self, x):
    """float32 fc1 output before the activation, `[..., N]` (a neuron fires where it is > 0 under ReLU)."""
    w_in = self.w_in_nd[...]
    h = jnp.einsum("...d,nd->...n", x.astype(w_in.dtype), w_in, preferred_element_type=jnp.float32)
    if self.b_in_n is not None:
      h = h + self.b_in_n[...].astype(jnp.float32)
    return h

  def __call__(self, x):
    w_in = self.w_in_nd[...]
    h = ACTIVATIONS[self.activation](self.pre_activation(x)).astype(w_in.dtype)
    y = jnp.einsum("...n,nd->...d", h, self.w_out_nd[...], preferred_element_type=jnp.float32)
    if self.b_out_d is not None:
      y = y + self.b_out_d[...].astype(jnp.float32)
    return y.astype(w_in.dtype)

  @property
  def decodes_in_kernels(self) -> bool:
    """Whether `decode` runs the skinny_matmul kernels (a ReLU MLP: the activation in fc1's epilogue)."""
    return self.activation == "relu"

  def decode(self, x_md, *, residual_md=None, implementation=None) -> pallas_kernels.MatmulOut:
    """The decode step's dense MLP of a few rows `[M, d]` (`decodes_in_kernels`): fc1 from its `[N, d]` rows
    (`skinny_matmul(w_layout="nk")`) with its bias and ReLU in the epilogue, rounded to the weights' dtype as
    `__call__` does; fc2 with its bias and, given `residual_md`, `residual_md + mlp(x)` in its epilogue (the
    result's y). Same values as `__call__` up to float32 summation order."""
    if not self.decodes_in_kernels:
      y = self(x_md)
      return pallas_kernels.MatmulOut(y if residual_md is None else residual_md + y)
    w_in = self.w_in_nd[...]
    b_in = None if self.b_in_n is None else self.b_in_n[...]
    b_out = None if self.b_out_d is None else self.b_out_d[...]
    # fc1 hands fc2 zeroed split-K counters (no zero-fill kernel before fc2)
    fc1 = pallas_kernels.skinny_matmul(x_md.astype(w_in.dtype), w_in, b_in, activation="relu", w_layout="nk",
                                       emit_counters=True, implementation=implementation)
    residual = None if residual_md is None else residual_md.astype(w_in.dtype)
    return pallas_kernels.skinny_matmul(fc1.y, self.w_out_nd[...], b_out, residual, counters_C=fc1.counters,
                                        implementation=implementation)

  def sparse(self, x_md, idx_k, *, implementation=None):
    """The MLP over neurons `idx_k` only (`[k]` int32, a batch-union set): gathered fc1 (bias, activation)
    then gathered fc2 plus the full fc2 bias. Equals the dense MLP when idx holds every firing neuron."""
    w_in = self.w_in_nd[...]
    b_in = None if self.b_in_n is None else self.b_in_n[...]
    b_out = None if self.b_out_d is None else self.b_out_d[...]
    x = x_md.astype(w_in.dtype)
    h_mk = pallas_kernels.gather_matmul_cols(x, w_in, idx_k, b_in, self.activation, implementation=implementation)
    return pallas_kernels.gather_matmul_rows(h_mk, self.w_out_nd[...], idx_k, b_out, implementation=implementation)


def make_mlp(config: ModelConfig, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
  if config.mlp == "gated":
    return GatedMLP(config, dtype=dtype, rngs=rngs)
  return NeuronMLP(config, dtype=dtype, rngs=rngs)
