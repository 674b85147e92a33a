"""Public skinny (decode) matmul: validation, dispatch.

  out = skinny_matmul(x_MK, w_KN, bias_N=None, residual_MN=None, out_dtype=None)          # out.y: [M, N]
  out = skinny_matmul(x_MK, w_KN, side=Side(w2_KP, b2_P))                                 # out.side: [M, P]

The result is always a `MatmulOut`; each epilogue option (`Side`, `RmsInput`, `norm_scale_N`, `emit_counters`)
fills its own field. `y = x @ w` accumulated in float32, plus the bias, cast to `out_dtype` (w's dtype by
default), then plus the residual in `out_dtype` (the model's `h + o_proj(ctx)`). With `side=Side(w, b)`, a second small weight (a head router)
is streamed by extra programs of the same kernel and its float32 product `x @ side_w + side_b` is returned too
(give it `side_width(P)` columns, zero-padded: narrower side weights are read by unpipelined gathers, measured
+12 us per call for an [4096, 8] router next to Llama-3.1-8B's q|k|v on an H100).
With `glu="silu"`, w's columns are neuron-interleaved (gate, up) pairs (a fused gate|up projection) and the output
is `silu(gate) * up` (N / 2 wide), computed in the kernel's epilogue from the float32 sums. `activation="relu"`:
`relu(x @ w + bias)` before the cast (OPT's fc1). `w_layout="nk"`: w is given as `[N, K]` (per-neuron rows, as
OPT's fc1 weight is stored for the neuron gathers), y = x @ w.T, its tiles loaded `[block_n, block_k]`.
`row_weights_M` (float `[M]`): the result is `[N]`, `sum_m row_weights[m] * y[m]` of the float32 y (after bias and
activation) in `out_dtype` (a batch-union neuron score from the router's up-projection; the kernel needs all rows
in one block, M <= 64, and a plain output).
Deferred RMSNorm (the decode step's norms without kernels of their own): `rms=RmsInput(sq_TM, eps)` scales the rows
of both products by the norm factor of the hidden state x was made from (x = h * g, the squares of h given as
float32 partial sums [T, M]) before the biases: `rmsnorm(h) @ w`; `norm_scale_N=g` also returns `y * g` and `sq [T, M]`,
y prepared for the next norm's consumer (`skinny_matmul_xla.deferred_norm`). `Side(..., topk=(G, k))`: the side result
is each row's top-k of its first G side scores, int32 [M, k] (`rank_topk`: `lax.top_k`'s indices), computed in the
side program's epilogue (a head router's group selection without a kernel of its own). "pallas": one kernel
that streams the weight once and writes the finished output (`skinny_matmul_triton`: no float32 partials for a
separate XLA reduce); "xla": the reference (`skinny_matmul_xla`), also used for shapes the kernel does not take
(rows > `MAX_ROWS`, dtypes other than bfloat16 / float16 / float32).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import _platform
from pallas_kernels import skinny_matmul_triton as _triton
from pallas_kernels import skinny_matmul_xla as _xla
from pallas_kernels.topk_select_xla import rank_topk
from pallas_kernels.skinny_matmul_triton import MatmulConfig

# The kernel is for decode: a few rows against a streamed weight. Prefill-sized inputs go to XLA's GEMMs.
MAX_ROWS = 128
_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def side_width(p: int) -> int:
  """Columns to give a side weight of p columns (zero-padded): a power of two >= 16, so that every side program
  streams whole, contiguous column tiles (`skinny_matmul_triton.side_block`) with pipelined loads."""
  return max(16, _platform.next_pow2(p))


class Side(NamedTuple):
  """A second, narrow weight streamed by extra programs of the same kernel (a head router next to q|k|v): the
  result's `side` is float32 `x @ w_KP + b_P`, or with `topk=(G, k)` int32 `[M, k]`, each row's top-k of its first G
  scores (`rank_topk`: `lax.top_k`'s indices), picked in the side program's epilogue when it holds a whole row.
  Give w `side_width(P)` columns, zero-padded, so that the side programs stream whole column tiles."""

  w_KP: jax.Array
  b_P: jax.Array | None = None
  topk: tuple[int, int] | None = None


class RmsInput(NamedTuple):
  """The deferred RMSNorm of x: x's rows are `h * g` and `sq_TM` (float32 `[T, M]`, summed over T) holds h's
  squares; the epilogue scales both products' rows by `rsqrt(sum / K + eps)`, i.e. computes `rmsnorm(h) @ w`."""

  sq_TM: jax.Array
  eps: float


class MatmulOut(NamedTuple):
  """What `skinny_matmul` returns, always this type; a field is None unless its option was asked for.

  y: `[M, N]` in out_dtype (`[M, N / 2]` with glu; `[N]` with row_weights_M).
  side: the `Side` product (float32 `[M, P]`, or int32 `[M, k]` with `Side.topk`).
  normed, sq_TM: with `norm_scale_N=g`, `y * g` and y's squares `[T, M]` (a `RmsInput` for the next call).
  counters: with `emit_counters`, a zeroed int32 `[COUNTERS]` buffer for the next call's `counters_C`.
  """

  y: jax.Array
  side: jax.Array | None = None
  normed: jax.Array | None = None
  sq_TM: jax.Array | None = None
  counters: jax.Array | None = None


def skinny_matmul(x_MK, w_KN, bias_N=None, residual_MN=None, *, out_dtype=None, side: Side | None = None,
                  glu: str | None = None, activation: str | None = None, w_layout: str = "kn",
                  rms: RmsInput | None = None, norm_scale_N=None, counters_C=None, emit_counters: bool = False,
                  row_weights_M=None, implementation: str | None = None,
                  config: MatmulConfig | None = None) -> MatmulOut:
  """See the module docstring. Raises ValueError on inconsistent shapes or dtypes.

  `emit_counters=True` returns a zeroed int32 `[COUNTERS]` buffer (`MatmulOut.counters`), written by this kernel;
  pass it as `counters_C` to the next call, whose split-K counters then need no zero-fill kernel (XLA materialises
  a constant zeros operand with a copy before each kernel that updates it in place)."""
  side_w_KP, side_b_P, side_topk = side if side is not None else (None, None, None)
  rms_sq_TM, rms_eps = rms if rms is not None else (None, None)
  if w_layout not in _xla.W_LAYOUTS:
    raise ValueError(f"skinny_matmul: w_layout must be one of {_xla.W_LAYOUTS}, got {w_layout!r}")
  nk = w_layout == "nk"
  if x_MK.ndim != 2 or w_KN.ndim != 2 or x_MK.shape[1] != w_KN.shape[1 if nk else 0]:
    want = "[N, K] (w_layout='nk')" if nk else "[K, N]"
    raise ValueError(f"skinny_matmul needs x [M, K] and w {want}, got {x_MK.shape} and {w_KN.shape}")
  (m, k), n = x_MK.shape, w_KN.shape[0 if nk else 1]
  if activation is not None and (activation not in _xla.ACTIVATIONS or glu is not None):
    raise ValueError(f"activation must be one of {sorted(_xla.ACTIVATIONS)} (and not with glu), got {activation!r}")
  if row_weights_M is not None and (row_weights_M.shape != (m,) or residual_MN is not None or glu is not None
                                    or side_w_KP is not None or norm_scale_N is not None or emit_counters):
    raise ValueError(f"row_weights_M must have shape ({m},) and needs a plain output (no residual, glu, side weight, "
                     f"norm_scale_N or emitted counters), got {getattr(row_weights_M, 'shape', None)}")
  if bias_N is not None and bias_N.shape != (n,):
    raise ValueError(f"bias must have shape ({n},), got {bias_N.shape}")
  out_dtype = jnp.dtype(out_dtype or w_KN.dtype)
  if glu is not None and (glu not in _xla.GLU_ACTIVATIONS or n % 2 or residual_MN is not None):
    raise ValueError(f"glu must be one of {sorted(_xla.GLU_ACTIVATIONS)} with an even N and no residual, got "
                     f"{glu!r}, N={n}")
  if residual_MN is not None and (residual_MN.shape != (m, n) or residual_MN.dtype != out_dtype):
    raise ValueError(f"residual must be [{m}, {n}] {out_dtype.name}, got {residual_MN.shape} "
                     f"{residual_MN.dtype}")
  if side_w_KP is not None and (side_w_KP.ndim != 2 or side_w_KP.shape[0] != k or side_w_KP.dtype != w_KN.dtype):
    raise ValueError(f"side weight must be [{k}, P] {w_KN.dtype}, got {side_w_KP.shape} {side_w_KP.dtype}")
  if side_b_P is not None and side_b_P.shape != (side_w_KP.shape[1],):
    raise ValueError(f"side bias must have shape [P] = ({side_w_KP.shape[1]},), got {side_b_P.shape}")
  _check_norm_args(m, n, rms_sq_TM, rms_eps, norm_scale_N)
  _check_side_topk(side_w_KP, side_topk)
  if norm_scale_N is not None and glu is not None:
    raise ValueError("skinny_matmul: norm_scale_N needs a plain output, not glu")
  norm_kw = dict(rms_sq_TM=rms_sq_TM, rms_eps=None if rms_eps is None else float(rms_eps), norm_scale_N=norm_scale_N)
  impl = _platform.resolve_implementation(implementation)
  out = None
  if impl == "pallas" and m <= MAX_ROWS and any(w_KN.dtype == d for d in _DTYPES) and min(m, k, n) > 0:
    if config is None:
      config = _triton.choose_config(m, k, n, jnp.dtype(w_KN.dtype).itemsize)
      config = dataclasses.replace(config, num_splits=1) if side_w_KP is not None else config
    elif side_w_KP is not None and config.num_splits > 1:
      raise ValueError("skinny_matmul: a side weight needs config.num_splits == 1")
    one_block = row_weights_M is None or m <= config.block_m   # (row sums need every row in one program)
    if (glu is None or n % config.block_n == 0) and one_block:   # (the gated epilogue takes whole (gate, up) tiles)
      in_kernel = side_topk is not None and _side_in_one_tile(side_w_KP, config)
      out = _triton.skinny_matmul_triton(x_MK.astype(w_KN.dtype), w_KN, bias_N, residual_MN, side_w_KP,
                                         side_b_P, counters_C, out_dtype=out_dtype, glu=glu, activation=activation,
                                         w_layout=w_layout, emit_counters=emit_counters, config=config,
                                         row_weights_M=row_weights_M,
                                         side_topk=side_topk if in_kernel else None,
                                         interpret=_platform.interpret_mode(), **norm_kw)
      out = _as_tuple(out)
      if side_topk is not None and not in_kernel:
        out = _side_topk_after(out, side_topk, at=1)
  if out is None:
    out = _as_tuple(_xla_jit(x_MK, w_KN, bias_N, residual_MN, out_dtype=out_dtype, side_w_KP=side_w_KP,
                             side_b_P=side_b_P, glu=glu, activation=activation, w_layout=w_layout, side_topk=side_topk,
                             row_weights_M=row_weights_M, **norm_kw))
    if emit_counters:
      out += (jnp.zeros((_triton.COUNTERS,), jnp.int32),)
  return _unpack(out, side=side is not None, norm=norm_scale_N is not None, counters=emit_counters)


def _as_tuple(out) -> tuple:
  return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _unpack(out: tuple, *, side: bool, norm: bool, counters: bool) -> MatmulOut:
  """The kernels' and the reference's results in their order (y, [side], [normed, sq], [counters]) as a
  `MatmulOut`."""
  it = iter(out)
  y = next(it)
  side_out = next(it) if side else None
  normed, sq = (next(it), next(it)) if norm else (None, None)
  counters_out = next(it) if counters else None
  return MatmulOut(y, side_out, normed, sq, counters_out)


_xla_jit = jax.jit(_xla.skinny_matmul_xla, static_argnames=("out_dtype", "glu", "activation", "w_layout", "rms_eps",
                                                             "side_topk"))


def _check_side_topk(side_w_KP, side_topk):
  if side_topk is None:
    return
  g, k = side_topk
  if side_w_KP is None or not 1 <= k <= g <= side_w_KP.shape[1]:
    raise ValueError(f"side_topk=(G, k)={side_topk} needs a side weight of at least G columns and 1 <= k <= G, "
                     f"got side weight {None if side_w_KP is None else side_w_KP.shape}")


def _side_in_one_tile(side_w_KP, config) -> bool:
  """Whether the kernel's side program holds each row's whole side product (then it can pick the top-k)."""
  return _triton.side_block(side_w_KP.shape[1], config.block_n) >= side_w_KP.shape[1]


def _side_topk_after(out, side_topk, *, at: int):
  """The kernel's results with the float32 side scores (`out[at]`) replaced by their top-k indices (a side weight
  wider than one column tile: the top-k as an XLA fusion after the kernel)."""
  g, k = side_topk
  return (*out[:at], _rank_topk(out[at][:, :g], k), *out[at + 1:])


_rank_topk = jax.jit(rank_topk, static_argnames=("k",))


def _check_norm_args(m, n, rms_sq_TM, rms_eps, norm_scale_N):
  if (rms_sq_TM is None) != (rms_eps is None):
    raise ValueError("skinny_matmul: rms_sq_TM (the rows' partial sums of squares) and rms_eps go together")
  if rms_sq_TM is not None and (rms_sq_TM.ndim != 2 or rms_sq_TM.shape[1] != m or rms_sq_TM.dtype != jnp.float32
                                or not rms_eps > 0):
    raise ValueError(f"rms_sq_TM must be float32 [T, {m}] with rms_eps > 0, got {rms_sq_TM.shape} "
                     f"{rms_sq_TM.dtype}, eps {rms_eps}")
  if norm_scale_N is not None and norm_scale_N.shape != (n,):
    raise ValueError(f"norm_scale_N must have shape ({n},), got {norm_scale_N.shape}")
