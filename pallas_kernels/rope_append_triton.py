"""The decode step's q/k rotation and K/V cache write as one Pallas kernel on the Triton backend.

After the fused q|k|v projection, XLA ran three small kernels per layer: q's RoPE (a concatenate fusion), and one
scatter per cache (k's RoPE inside the first). Measured on one H100 (`profile_step.py --instances`,
LLaMA-2-7B B32): 2.3 + 3.1 + 3.1 us per layer, each mostly launch and latency. Here one program per (row, KV
group) reads the group's G query heads, key and value from the fused row, rotates q and k (cos/sin of the row's
position computed in registers), stores q, and writes k and v into the group's slot of the caches, which are
aliased to the outputs (updated in place when the caller's buffers are donated or dead after the call). An 8-bit
cache (`pallas_kernels.kv_quant`) gets k and v quantised in registers and their scales written beside them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _platform
from pallas_kernels import kv_quant


def _kernel(*refs, group_size: int, rope: bool, quantised: bool = False):
  """Program (b, g): refs = (pos_ref [B], [inv_ref [D/2],] x_ref [B, N], k_ref, v_ref [B, Hkv, S, D], [ks_ref,
  vs_ref [B, Hkv, S],] q_ref [B, Hq, D], k_out, v_out, [ks_out, vs_out] (aliased to the caches and scales))."""
  ks_out = vs_out = None
  if quantised:
    *refs, ks_out, vs_out = refs
    refs = refs[:-5] + refs[-3:]   # drop the aliased scale inputs (before q_ref, k_out, v_out)
  if rope:
    pos_ref, inv_ref, x_ref, _, _, q_ref, k_out, v_out = refs
  else:
    (pos_ref, x_ref, _, _, q_ref, k_out, v_out), inv_ref = refs, None
  b, g = pl.program_id(0), pl.program_id(1)
  _, _, seq_len, head_dim = k_out.shape
  base = g * (group_size + 2) * head_dim          # group g's G query heads, then its key, then its value
  # Padded query rows repeat the last real one: identical values stored to the same address (benign).
  rows_g = jnp.minimum(jnp.arange(_platform.next_pow2(group_size), dtype=jnp.int32), group_size - 1)
  d_d = jnp.arange(head_dim, dtype=jnp.int32)
  half = head_dim // 2
  partner_d = (d_d + half) % head_dim             # rotate-half: d pairs with d + half (mod D)
  q_cols = lambda cols: base + rows_g[:, None] * head_dim + cols[None, :]  # noqa: E731
  k_cols = lambda cols: base + group_size * head_dim + cols  # noqa: E731
  q_gd = x_ref[b, q_cols(d_d)]
  k_d = x_ref[b, k_cols(d_d)]
  v_d = x_ref[b, k_cols(d_d) + head_dim]
  pos = pos_ref[b]
  if rope:
    ang_d = pos.astype(jnp.float32) * inv_ref[d_d % half]
    cos_d, sin_d = jnp.cos(ang_d), jnp.sin(ang_d)
    sign_d = jnp.where(d_d < half, -1.0, 1.0)

    def rotate(x, partner):
      return (x.astype(jnp.float32) * cos_d + sign_d * partner.astype(jnp.float32) * sin_d).astype(x.dtype)

    q_gd = rotate(q_gd, x_ref[b, q_cols(partner_d)])
    k_d = rotate(k_d, x_ref[b, k_cols(partner_d)])
  q_ref[b, (g * group_size + rows_g)[:, None], d_d[None, :]] = q_gd.astype(q_ref.dtype)

  @pl.when((pos >= 0) & (pos < seq_len))
  def _():
    slot = jnp.clip(pos, 0, seq_len - 1)
    if quantised:
      k_q, k_s = kv_quant.quantise(k_d, k_out.dtype)
      v_q, v_s = kv_quant.quantise(v_d, v_out.dtype)
      k_out[b, g, slot, :] = k_q
      v_out[b, g, slot, :] = v_q
      ks_out[b, g, slot] = k_s
      vs_out[b, g, slot] = v_s
    else:
      k_out[b, g, slot, :] = k_d.astype(k_out.dtype)
      v_out[b, g, slot, :] = v_d.astype(v_out.dtype)


@functools.partial(jax.jit, static_argnames=("num_heads", "interpret"))
def rope_append_triton(qkv_BN, positions_B, inv_freq_F, k_BHSD, v_BHSD, *, num_heads: int, interpret: bool,
                       k_scale_BHS=None, v_scale_BHS=None):
  """As `rope_append_xla.rope_append_xla` (same signature); the caches (and an 8-bit cache's scales) are aliased to
  the outputs."""
  B, N = qkv_BN.shape
  _, Hkv, S, D = k_BHSD.shape
  G = num_heads // Hkv
  rope = inv_freq_F is not None
  whole = lambda shape: pl.BlockSpec(shape, lambda b, g: (0,) * len(shape))  # noqa: E731
  in_specs = [whole((B,))] + ([whole((D // 2,))] if rope else []) + [
      whole((B, N)), whole((B, Hkv, S, D)), whole((B, Hkv, S, D))]
  args = [positions_B.astype(jnp.int32)] + ([inv_freq_F.astype(jnp.float32)] if rope else []) + [
      qkv_BN, k_BHSD, v_BHSD]
  first_cache = len(args) - 2
  out_specs = [whole((B, num_heads, D)), whole((B, Hkv, S, D)), whole((B, Hkv, S, D))]
  out_shape = [jax.ShapeDtypeStruct((B, num_heads, D), qkv_BN.dtype),
               jax.ShapeDtypeStruct(k_BHSD.shape, k_BHSD.dtype),
               jax.ShapeDtypeStruct(v_BHSD.shape, v_BHSD.dtype)]
  aliases = {first_cache: 1, first_cache + 1: 2}
  quantised = k_scale_BHS is not None
  if quantised:
    in_specs += [whole((B, Hkv, S))] * 2
    args += [k_scale_BHS, v_scale_BHS]
    out_specs += [whole((B, Hkv, S))] * 2
    out_shape += [jax.ShapeDtypeStruct(k_scale_BHS.shape, k_scale_BHS.dtype)] * 2
    aliases.update({first_cache + 2: 3, first_cache + 3: 4})
  return tuple(pl.pallas_call(
      functools.partial(_kernel, group_size=G, rope=rope, quantised=quantised),
      grid=(B, Hkv),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
      interpret=interpret,
      name="rope_append",
  )(*args))
