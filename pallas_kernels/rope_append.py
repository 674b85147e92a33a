"""Public fused RoPE + KV-cache append of the decode step: validation, dispatch.

  q_BHD, k_cache, v_cache = rope_append(qkv_BN, positions_B, inv_freq_F, k_cache, v_cache, num_heads=Hq)

`qkv_BN` is one decode token's fused projection in KV-group-major order (`polar_jax.fusion.fuse_qkv`: for each
group g, its G = Hq / Hkv query heads, its key, its value, D each). Returns q `[B, Hq, D]` rotated at
`positions_B` (rotate-half RoPE as Hugging Face; `inv_freq_F` `[D/2]`, None: no rotation, as OPT), and the caches
with the rotated key and the value written at slot `positions_B[b]` of every group (dropped outside `[0, S)`),
in place when the caller donates them. "pallas": one small kernel (`rope_append_triton`) instead of XLA's three;
"xla": the reference (`rope_append_xla`). An 8-bit cache (int8 / float8_e4m3fn with `k_scale=`, `v_scale=`, float32
`[B, Hkv, S]`, `pallas_kernels.kv_quant`) gets the new key and value quantised with one scale per group, and the
call returns `(q, k_cache, v_cache, k_scale, v_scale)`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _platform
from pallas_kernels import kv_quant
from pallas_kernels import rope_append_triton as _triton
from pallas_kernels import rope_append_xla as _xla


def rope_append(qkv_BN, positions_B, inv_freq_F, k_cache, v_cache, *, num_heads: int,
                implementation: str | None = None, k_scale=None, v_scale=None):
  """See the module docstring. Raises ValueError on inconsistent shapes or dtypes."""
  if k_cache.ndim != 4 or k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
    raise ValueError(f"k_cache and v_cache must be [B, Hkv, S, D] of one shape and dtype, got {k_cache.shape} "
                     f"{k_cache.dtype} and {v_cache.shape} {v_cache.dtype}")
  kv_quant.check_scales("k_cache", k_cache, k_scale)
  kv_quant.check_scales("v_cache", v_cache, v_scale)
  scales = {} if k_scale is None else dict(k_scale_BHS=k_scale, v_scale_BHS=v_scale)
  B, Hkv, _, D = k_cache.shape
  if num_heads % Hkv:
    raise ValueError(f"num_heads={num_heads} is not a multiple of Hkv={Hkv}")
  N = (num_heads + 2 * Hkv) * D
  if qkv_BN.shape != (B, N):
    raise ValueError(f"qkv must be [B, (Hq + 2 Hkv) D] = {(B, N)}, got {qkv_BN.shape}")
  if positions_B.shape != (B,) or not jnp.issubdtype(positions_B.dtype, jnp.integer):
    raise ValueError(f"positions must be an integer [B={B}] array, got {positions_B.shape} {positions_B.dtype}")
  if inv_freq_F is not None:
    inv_freq_F = jnp.asarray(inv_freq_F, jnp.float32)
    if D % 2 or inv_freq_F.shape != (D // 2,):
      raise ValueError(f"inv_freq must have shape ({D // 2},) for head_dim {D}, got {inv_freq_F.shape}")
  impl = _platform.resolve_implementation(implementation)
  if impl == "pallas" and D == _platform.next_pow2(D) and D >= 16:
    return _triton.rope_append_triton(qkv_BN, positions_B, inv_freq_F, k_cache, v_cache, num_heads=num_heads,
                                      interpret=_platform.interpret_mode(), **scales)
  return _xla_jit(qkv_BN, positions_B, inv_freq_F, k_cache, v_cache, num_heads=num_heads, **scales)


_xla_jit = jax.jit(_xla.rope_append_xla, static_argnames=("num_heads",))
