"""Public gathered matmuls for the batch-union sparse MLP: validation, dispatch.

Typical OPT-style use with a static index length and a dynamic union size:
  h_Mk = gather_matmul_cols(x_Md, fc1_w_Nd, idx_k, fc1_b_N, "relu", count=c)
  y_Md = gather_matmul_rows(h_Mk, fc2_wT_Nd, idx_k, fc2_b_d, count=c)
where fc2_wT_Nd = fc2.weight.T (one row per neuron, contiguous along d).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _platform
from pallas_kernels import gather_matmul_triton as _triton
from pallas_kernels import gather_matmul_xla as _xla


def _check_2d(name, a):
  if a.ndim != 2:
    raise ValueError(f"{name} must be 2-D, got shape {a.shape}")


def _check_float(name, a):
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point, got {a.dtype}")


def _check_common(a_name, a, w_name, w, idx, bias, bias_len, count):
  _check_2d(a_name, a)
  _check_2d(w_name, w)
  _check_float(a_name, a)
  if a.dtype != w.dtype:
    raise ValueError(f"{a_name} dtype {a.dtype} != {w_name} dtype {w.dtype}")
  if a.shape[0] < 1:
    raise ValueError(f"{a_name} needs at least one row, got {a.shape}")
  if idx.ndim != 1 or idx.shape[0] < 1:
    raise ValueError(f"idx must be a non-empty 1-D array, got {idx.shape}")
  if not jnp.issubdtype(idx.dtype, jnp.integer):
    raise ValueError(f"idx must have an integer dtype, got {idx.dtype}")
  n = w.shape[0]
  if _platform.is_concrete(idx):
    i = np.asarray(idx)
    if i.min() < 0 or i.max() >= n:
      raise ValueError(f"idx values must lie in [0, {n}), got range "
                       f"[{i.min()}, {i.max()}]")
  if bias is not None:
    _check_float("bias", bias)
    if bias.shape != (bias_len,):
      raise ValueError(f"bias must have shape ({bias_len},), got {bias.shape}")
  if count is not None:
    if count.size != 1 or count.ndim > 1:
      raise ValueError(f"count must be a scalar, got shape {count.shape}")
    if not jnp.issubdtype(count.dtype, jnp.integer):
      raise ValueError(f"count must have an integer dtype, got {count.dtype}")
    if _platform.is_concrete(count):
      c = int(np.asarray(count).reshape(()))
      if not 0 <= c <= idx.shape[0]:
        raise ValueError(f"count={c} must lie in [0, {idx.shape[0]}]")


def _count_1(count, k):
  if count is None:
    return jnp.full((1,), k, jnp.int32)
  return jnp.reshape(count, (1,)).astype(jnp.int32)


def _check_config(config):
  if config is not None and not isinstance(config, (_triton.GatherConfig, _triton.GatherHeuristics)):
    raise TypeError(f"config must be a GatherConfig, a GatherHeuristics or None, got {type(config).__name__}")


def _config(config, choose, *shape):
  """`config` itself (a GatherConfig), or chosen by `choose(*shape)` with `config`'s rules (a GatherHeuristics;
  None: the default rules)."""
  if isinstance(config, _triton.GatherConfig):
    return config
  return choose(*shape, heuristics=config or _triton.GatherHeuristics())


_cols_xla = jax.jit(_xla.gather_matmul_cols_xla, static_argnames=("activation",))
_rows_xla = jax.jit(_xla.gather_matmul_rows_xla)


def gather_matmul_cols(x, w_in, idx, bias=None, activation=None, *, count=None,
                       implementation=None, config=None):
  """act(x @ w_in[idx].T + bias[idx]): the first matmul of a sparse MLP.

  Args:
    x: [M, d] activations (bf16, fp16 or float32).
    w_in: [N, d] weights, one contiguous row per neuron (torch fc1.weight).
    idx: [k] int neuron indices (static length; entries >= count are padding and
      may hold any in-range value). Out-of-range values raise when concrete and
      are clamped under jit.
    bias: optional [N] bias.
    activation: None, "relu", "gelu" (exact erf form) or "silu".
    count: optional int scalar array, the number of real entries of idx.
    implementation: None (pallas on GPU, xla elsewhere), "pallas" (interpret
      mode off GPU) or "xla".
    config: "pallas" only: a `GatherConfig` (the tiling, as given), a
      `GatherHeuristics` (rules that choose one from the shapes) or None (the
      default rules).

  Returns:
    [M, k] in x's dtype (float32 accumulation); columns >= count are exactly 0.
  """
  impl = _platform.resolve_implementation(implementation)
  _check_config(config)
  idx = jnp.asarray(idx)
  count = None if count is None else jnp.asarray(count)
  if activation not in _xla.ACTIVATIONS:
    raise ValueError(f"unknown activation {activation!r}; expected one of "
                     f"{_xla.ACTIVATIONS}")
  _check_common("x", x, "w_in", w_in, idx, bias,
                w_in.shape[0] if w_in.ndim == 2 else None, count)
  if x.shape[1] != w_in.shape[1]:
    raise ValueError(f"x {x.shape} and w_in {w_in.shape} disagree on d")
  if impl == "xla":
    return _cols_xla(x, w_in, idx, bias, activation, count=count)
  m, d = x.shape
  k = idx.shape[0]
  config = _config(config, _triton.choose_cols_config, m, d, k,
                   jnp.dtype(x.dtype).itemsize)
  return _triton.gather_matmul_cols_triton(
      x, w_in, idx.astype(jnp.int32), bias, _count_1(count, k),
      activation=activation, config=config,
      interpret=_platform.interpret_mode())


def gather_matmul_rows(h, w_out, idx, bias=None, *, count=None,
                       implementation=None, config=None):
  """h @ w_out[idx] + bias: the second matmul of a sparse MLP.

  Args:
    h: [M, k] activations of the selected neurons (output of the cols op).
    w_out: [N, d] weights, one contiguous row per neuron (torch fc2.weight.T).
    idx: [k] int neuron indices, as for `gather_matmul_cols`.
    bias: optional [d] bias.
    count: optional int scalar array; positions >= count are not added.
    implementation, config: as for `gather_matmul_cols`.

  Returns:
    [M, d] in h's dtype (float32 accumulation).
  """
  impl = _platform.resolve_implementation(implementation)
  _check_config(config)
  idx = jnp.asarray(idx)
  count = None if count is None else jnp.asarray(count)
  _check_common("h", h, "w_out", w_out, idx, bias,
                w_out.shape[1] if w_out.ndim == 2 else None, count)
  if h.shape[1] != idx.shape[0]:
    raise ValueError(f"h has {h.shape[1]} columns but idx has {idx.shape[0]} "
                     "entries")
  if impl == "xla":
    return _rows_xla(h, w_out, idx, bias, count=count)
  m, k = h.shape
  d = w_out.shape[1]
  config = _config(config, _triton.choose_rows_config, m, d, k,
                   jnp.dtype(h.dtype).itemsize)
  return _triton.gather_matmul_rows_triton(
      h, w_out, idx.astype(jnp.int32), bias, _count_1(count, k),
      config=config, interpret=_platform.interpret_mode())
