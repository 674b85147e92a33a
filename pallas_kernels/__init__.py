"""Pallas GPU kernels for Polar Sparsity decoding, each with an XLA reference.

Public ops (implementation=None picks "pallas" on GPU, "xla" elsewhere):
  selective_decode_attention: decode attention over selected KV groups (persistent programs looping over the
    selected (row, group) items, or split-K + merge where B x K is small).
  selective_decode_attention_append: appends the new token's K/V to every group (one XLA scatter per cache, or
    in the direct kernel with `AttentionConfig(append_in_kernel=True)`), then the same attention.
  merge_attention_partials: merges (o, m, l) residuals of disjoint partials.
  gather_matmul_cols: act(x @ w_in[idx].T + bias[idx]) (first MLP matmul).
  gather_matmul_rows: h @ w_out[idx] + bias (second MLP matmul).
  rope_append: the decode step's q/k RoPE and K/V cache write from the fused q|k|v projection, one kernel.
  skinny_matmul: x @ w (+ bias) (+ residual) for a few rows (the decode step's projections), one kernel.
  qkv_rope_append: the fused q|k|v projection with rope_append in its epilogue, one kernel.
  topk_select: per row, the indices of the k largest scores in ascending order (the batch-union neurons).
"""
from pallas_kernels.decode_attention import merge_attention_partials
from pallas_kernels.decode_attention import selective_decode_attention
from pallas_kernels.decode_attention import selective_decode_attention_append
from pallas_kernels.decode_attention_triton import AttentionConfig
from pallas_kernels.gather_matmul import gather_matmul_cols
from pallas_kernels.gather_matmul import gather_matmul_rows
from pallas_kernels.gather_matmul_triton import GatherConfig
from pallas_kernels.rope_append import rope_append
from pallas_kernels.skinny_matmul import MatmulConfig
from pallas_kernels.skinny_matmul import qkv_rope_append
from pallas_kernels.skinny_matmul_xla import GLU_ACTIVATIONS
from pallas_kernels.skinny_matmul import skinny_matmul
from pallas_kernels.topk_select import topk_select

__all__ = [
    "AttentionConfig",
    "GLU_ACTIVATIONS",
    "GatherConfig",
    "MatmulConfig",
    "gather_matmul_cols",
    "gather_matmul_rows",
    "merge_attention_partials",
    "qkv_rope_append",
    "rope_append",
    "selective_decode_attention",
    "selective_decode_attention_append",
    "skinny_matmul",
    "topk_select",
]
