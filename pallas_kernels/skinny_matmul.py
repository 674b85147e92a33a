"""Public skinny (decode) matmul: validation, dispatch.

  y_MN = skinny_matmul(x_MK, w_KN, bias_N=None, residual_MN=None, out_dtype=None)
  y_MN, side_MP = skinny_matmul(x_MK, w_KN, side_w_KP=w2, side_b_P=b2)

`y = x @ w` accumulated in float32, plus the bias, cast to `out_dtype` (w's dtype by default), then plus the
residual in `out_dtype` (the model's `h + o_proj(ctx)`). With `side_w_KP`, a second small weight (a head router)
is streamed by extra programs of the same kernel and its float32 product `x @ side_w + side_b` is returned too
(give it `side_width(P)` columns, zero-padded: narrower side weights are read by unpipelined gathers, measured
+12 us per call for an [4096, 8] router next to Llama-3.1-8B's q|k|v, benchmarks/NOTES.md session 10).
With `glu="silu"`, w's columns are neuron-interleaved (gate, up) pairs (a fused gate|up projection) and the output
is `silu(gate) * up` (N / 2 wide), computed in the kernel's epilogue from the float32 sums. `activation="relu"`:
`relu(x @ w + bias)` before the cast (OPT's fc1). `w_layout="nk"`: w is given as `[N, K]` (per-neuron rows, as
OPT's fc1 weight is stored for the neuron gathers), y = x @ w.T, its tiles loaded `[block_n, block_k]`.
`row_weights_M` (float `[M]`): the result is `[N]`, `sum_m row_weights[m] * y[m]` of the float32 y (after bias and
activation) in `out_dtype` (a batch-union neuron score from the router's up-projection; the kernel needs all rows
in one block, M <= 64, and a plain output).
Deferred RMSNorm (the decode step's norms without kernels of their own): `rms_sq_TM` + `rms_eps` scale the rows
of both products by the norm factor of the hidden state x was made from (x = h * g, the squares of h given as
float32 partial sums [T, M]) before the biases: `rmsnorm(h) @ w`; `norm_scale_N=g` appends `(y * g, sq [T, M])`,
y prepared for the next norm's consumer (`skinny_matmul_xla.deferred_norm`). `side_topk=(G, k)`: the side result
is each row's top-k of its first G side scores, int32 [M, k] (`rank_topk`: `lax.top_k`'s indices), computed in the
side program's epilogue (a head router's group selection without a kernel of its own). "pallas": one kernel
that streams the weight once and writes the finished output (`skinny_matmul_triton`: no float32 partials for a
separate XLA reduce); "xla": the reference (`skinny_matmul_xla`), also used for shapes the kernel does not take
(rows > `MAX_ROWS`, dtypes other than bfloat16 / float16 / float32).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import _platform
from pallas_kernels import rope_append_xla as _rope_xla
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


def skinny_matmul(x_MK, w_KN, bias_N=None, residual_MN=None, *, out_dtype=None, side_w_KP=None, side_b_P=None,
                  glu: str | None = None, activation: str | None = None, w_layout: str = "kn", rms_sq_TM=None,
                  rms_eps: float | None = None, norm_scale_N=None, side_topk: tuple[int, int] | None = None,
                  counters_C=None, emit_counters: bool = False, row_weights_M=None, implementation: str | None = None,
                  config: MatmulConfig | None = None):
  """See the module docstring. Raises ValueError on inconsistent shapes or dtypes.

  `emit_counters=True` appends a zeroed int32 `[COUNTERS]` buffer to the results, written by this kernel; pass
  it as `counters_C` to the next call, whose split-K counters then need no zero-fill kernel (XLA materialises a
  constant zeros operand with a copy before each kernel that updates it in place)."""
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
  if side_b_P is not None and (side_w_KP is None or side_b_P.shape != (side_w_KP.shape[1],)):
    raise ValueError(f"side bias needs a side weight and shape [P], got {side_b_P.shape}")
  _check_norm_args(m, n, rms_sq_TM, rms_eps, norm_scale_N)
  _check_side_topk(side_w_KP, side_topk)
  if norm_scale_N is not None and glu is not None:
    raise ValueError("skinny_matmul: norm_scale_N needs a plain output, not glu")
  norm_kw = dict(rms_sq_TM=rms_sq_TM, rms_eps=None if rms_eps is None else float(rms_eps), norm_scale_N=norm_scale_N)
  impl = _platform.resolve_implementation(implementation)
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
      return out if side_topk is None or in_kernel else _side_topk_after(out, side_topk, at=1)
  out = _xla_jit(x_MK, w_KN, bias_N, residual_MN, out_dtype=out_dtype, side_w_KP=side_w_KP, side_b_P=side_b_P,
                 glu=glu, activation=activation, w_layout=w_layout, side_topk=side_topk, row_weights_M=row_weights_M,
                 **norm_kw)
  if not emit_counters:
    return out
  return (*(out if isinstance(out, tuple) else (out,)), jnp.zeros((_triton.COUNTERS,), jnp.int32))


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


def qkv_rope_append(x_MK, w_KN, bias_N, positions_M, inv_freq_F, k_cache, v_cache, *, num_heads: int,
                    side_w_KP=None, side_b_P=None, rms_sq_TM=None, rms_eps: float | None = None,
                    side_topk: tuple[int, int] | None = None, emit_counters: bool = False,
                    implementation: str | None = None, config: MatmulConfig | None = None):
  """The fused q|k|v projection with `rope_append` in its epilogue: `(q [M, Hq, D], k_cache, v_cache[, side]
  [, counters])` equal to `rope_append(skinny_matmul(x, w, bias), positions, inv_freq, k_cache, v_cache)` (w's
  columns KV-group-major, `polar_jax.fusion.fuse_qkv`; the qkv product rounded to w's dtype first). "pallas": one
  kernel whose column tiles are whole heads (block_n = head_dim), q and k rotated in registers, k and v stored
  straight into the caches' slots (aliased: in place when the caller donates them); "xla": the two references.
  `rms_sq_TM`, `rms_eps`, `side_topk`: the deferred RMSNorm and the side top-k, as `skinny_matmul`."""
  if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
    raise ValueError(f"k_cache and v_cache must be [M, Hkv, S, D] of one shape, got {k_cache.shape}, "
                     f"{v_cache.shape}")
  m, hkv, _, d = k_cache.shape
  if x_MK.ndim != 2 or x_MK.shape[0] != m or w_KN.ndim != 2 or w_KN.shape[1] != (num_heads + 2 * hkv) * d:
    raise ValueError(f"qkv_rope_append needs x [{m}, K] and w [K, (Hq + 2 Hkv) D = {(num_heads + 2 * hkv) * d}], "
                     f"got {x_MK.shape} and {w_KN.shape}")
  _check_norm_args(m, w_KN.shape[1], rms_sq_TM, rms_eps, None)
  _check_side_topk(side_w_KP, side_topk)
  norm_kw = dict(rms_sq_TM=rms_sq_TM, rms_eps=None if rms_eps is None else float(rms_eps))
  impl = _platform.resolve_implementation(implementation)
  pow2 = d == _platform.next_pow2(d) and d >= 16
  if impl == "pallas" and m <= MAX_ROWS and pow2 and any(w_KN.dtype == t for t in _DTYPES):
    itemsize = jnp.dtype(w_KN.dtype).itemsize
    config = config or _triton.choose_config(m, x_MK.shape[1], w_KN.shape[1], itemsize)
    bk = max(16, min(config.block_k, _triton.TILE_BYTES // (d * itemsize)))
    config = dataclasses.replace(config, block_n=d, block_k=bk, num_splits=1)
    inv = None if inv_freq_F is None else jnp.asarray(inv_freq_F, jnp.float32)
    in_kernel = side_topk is not None and _side_in_one_tile(side_w_KP, config)
    out = _triton.skinny_matmul_triton(
        x_MK.astype(w_KN.dtype), w_KN, bias_N, None, side_w_KP, side_b_P, None,
        positions_M.astype(jnp.int32), inv, k_cache, v_cache, out_dtype=jnp.dtype(w_KN.dtype), glu=None,
        emit_counters=emit_counters, rope_heads=(num_heads, hkv), config=config,
        side_topk=side_topk if in_kernel else None, interpret=_platform.interpret_mode(), **norm_kw)
    return out if side_topk is None or in_kernel else _side_topk_after(out, side_topk, at=3)   # (q, k, v first)
  out = skinny_matmul(x_MK, w_KN, bias_N, side_w_KP=side_w_KP, side_b_P=side_b_P, emit_counters=emit_counters,
                      side_topk=side_topk, implementation="xla", **norm_kw)
  out = list(out) if isinstance(out, tuple) else [out]
  q, k_cache, v_cache = _rope_append_xla(out[0], positions_M, inv_freq_F, k_cache, v_cache, num_heads=num_heads)
  return (q, k_cache, v_cache, *out[1:])


_rope_append_xla = jax.jit(_rope_xla.rope_append_xla, static_argnames=("num_heads",))
