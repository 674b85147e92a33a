"""Pure-XLA reference of `skinny_matmul`: what `polar_jax.layers.Linear` computes, plus the residual add."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.topk_select_xla import rank_topk

GLU_ACTIVATIONS = {"silu": jax.nn.silu}
ACTIVATIONS = {"relu": jax.nn.relu}        # `activation=`: elementwise on y after the bias (OPT's fc1)
W_LAYOUTS = ("kn", "nk")


def skinny_matmul_xla(x_MK, w_KN, bias_N=None, residual_MN=None, *, out_dtype=None, side_w_KP=None, side_b_P=None,
                      glu: str | None = None, activation: str | None = None, w_layout: str = "kn", rms_sq_TM=None,
                      rms_eps: float | None = None, norm_scale_N=None, side_topk: tuple[int, int] | None = None,
                      row_weights_M=None):
  """`y = x @ w` in float32 (IEEE float32 products for float32 inputs) (+ bias) (then `activation`, "relu"),
  cast to `out_dtype` (w's dtype by default); with a residual, `residual + y` in `out_dtype` (as the model's
  `h + o_proj(ctx)`). `w_layout="nk"`: w is given as `[N, K]` (a per-neuron / `nn.Linear` weight, OPT's fc1
  rows), y = x @ w.T; the side weight stays `[K, P]`. With
  `side_w_KP`, also returns float32 `x @ side_w + side_b` of the same x: `(y, side)`. With `glu` ("silu"), w's
  columns are neuron-interleaved (gate, up) pairs (`polar_jax.fusion.fuse_gate_up`) and y is `silu(gate) * up`
  (N / 2 wide), computed in float32. `side_topk=(G, k)`: the side result is instead int32 `[M, k]`, each row's
  top-k of its first G side scores (`rank_topk`: `lax.top_k`'s indices; a head router's group selection).

  Deferred RMSNorm (the decode step's norms without kernels of their own, `DecodeOptions.deferred_norm`):
  `rms_sq_TM` (float32 `[T, M]`, summed over T: each row's sum of squares of the hidden state h that x was
  made from, `x = h * g`) scales both products' rows by `rsqrt(sum / K + rms_eps)` before the biases, i.e.
  `rmsnorm(h) @ w`. `norm_scale_N` (a norm's weight g `[N]`) appends `(y * g, sq [T, M])` to the results, y's
  rows prepared for the next such call (here T = 1; the kernel writes one row per column tile).

  `row_weights_M` (float `[M]`): the result is instead `[N]`, `sum_m row_weights[m] * y[m]` over the float32 y
  (after bias and activation), cast to `out_dtype`: a batch-union score `sum_b active_b * relu(logits)` straight
  from the neuron router's up-projection (`polar_jax.routers.modules.decode_neuron_union`)."""
  out_dtype = jnp.dtype(out_dtype or w_KN.dtype)
  rs = None if rms_sq_TM is None else rms_row_scale(rms_sq_TM, x_MK.shape[1], rms_eps)
  y = _dot(x_MK, w_KN.T if w_layout == "nk" else w_KN)
  if rs is not None:
    y = y * rs
  if bias_N is not None:
    y = y + bias_N.astype(jnp.float32)
  if activation is not None:
    y = ACTIVATIONS[activation](y)
  if glu is not None:     # neuron-interleaved (gate, up) columns -> act(gate) * up
    pairs = y.reshape(*y.shape[:-1], -1, 2)
    y = GLU_ACTIVATIONS[glu](pairs[..., 0]) * pairs[..., 1]
  if row_weights_M is not None:   # the rows' weighted column sums in float32: `[N]`
    return jnp.sum(y * row_weights_M.astype(jnp.float32)[:, None], axis=0).astype(out_dtype)
  y = y.astype(out_dtype)
  y = y if residual_MN is None else residual_MN.astype(out_dtype) + y
  out = (y,)
  if side_w_KP is not None:
    side = _dot(x_MK, side_w_KP) * (1.0 if rs is None else rs)
    side = side if side_b_P is None else side + side_b_P.astype(jnp.float32)
    out += (side if side_topk is None else rank_topk(side[:, :side_topk[0]], side_topk[1]),)
  if norm_scale_N is not None:
    out += deferred_norm(y, norm_scale_N)
  return out if len(out) > 1 else y


def rms_row_scale(sq_TM, k: int, eps: float):
  """float32 `[M, 1]`: `rsqrt(sum_t sq[t] / k + eps)`, the RMSNorm factor of rows whose squares sum to sq."""
  return jax.lax.rsqrt(jnp.sum(sq_TM, axis=0) / k + eps)[:, None]


def deferred_norm(h_MN, g_N):
  """`(h * g, sq [1, M])` in h's dtype / float32: RMSNorm(h) = (h * g) * rms_row_scale(sq, N, eps), with the
  row factor left to the consumer's epilogue (what the kernel's `norm_scale_N` outputs hold)."""
  hf = h_MN.astype(jnp.float32)
  return (hf * g_N.astype(jnp.float32)).astype(h_MN.dtype), jnp.sum(hf * hf, axis=-1)[None]


def _dot(x, w):
  precision = jax.lax.Precision.HIGHEST if w.dtype == jnp.float32 else None   # IEEE float32, not TF32
  return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32, precision=precision)
