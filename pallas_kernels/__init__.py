"""Pallas GPU kernels for Polar Sparsity decoding, each with an XLA reference.

Every public op takes `implementation=`: None picks "pallas" on GPU and "xla" elsewhere; "pallas" off GPU runs the
kernel in Pallas interpret mode (slow, for tests); "xla" runs the reference. Each kernel's tiling is a frozen
`...Config`; the rules that choose it from the static shapes are the fields of a frozen `...Heuristics` whose
defaults are the measured winners (pallas_kernels/NOTES.md). No module global steers a compiled program.

Public ops:
  selective_decode_attention: decode attention over the selected KV groups of each row. Unsplit shapes run the
    persistent kernel (a few programs per SM looping over the (row, group) items) or, with
    `AttentionHeuristics(persistent=False)` or a head_dim it cannot take, one direct program per (row, group);
    where B x K is small, split-K programs and an XLA merge. `config=`: an `AttentionConfig` or an
    `AttentionHeuristics`.
  selective_decode_attention_append: writes the new token's K/V at every group's slot (one XLA scatter per cache),
    then the same attention.
  merge_attention_partials: merges (o, m, l) residuals of disjoint partials.
  selective_paged_decode_attention: the same attention over K/V page pools `[Hkv, num_pages, page_size, D]` and a
    per-row page table; one program per (row, selected group, key split). `config=`: a `PagedAttentionConfig` or a
    `PagedAttentionHeuristics`.
  gather_matmul_cols: act(x @ w_in[idx].T + bias[idx]) (first MLP matmul); `config=`: a `GatherConfig` or a
    `GatherHeuristics`.
  gather_matmul_rows: h @ w_out[idx] + bias (second MLP matmul); as gather_matmul_cols.
  rope_append: the decode step's q/k RoPE and K/V cache write from the fused q|k|v projection, one kernel.
  skinny_matmul: x @ w (+ bias) (+ residual) for a few rows (the decode step's projections), one kernel that
    streams the weight once, with the epilogues the decode step needs (gated product, a side weight and its
    top-k, the deferred RMSNorm); `config=`: a `MatmulConfig` (`MatmulHeuristics` are the rules of
    `skinny_matmul_triton.choose_config`).
  topk_select: per row, the indices of the k largest scores in ascending order (the batch-union neurons);
    `heuristics=`: a `TopkHeuristics`.
"""
from pallas_kernels.decode_attention import merge_attention_partials
from pallas_kernels.decode_attention import selective_decode_attention
from pallas_kernels.decode_attention import selective_decode_attention_append
from pallas_kernels.decode_attention_triton import AttentionConfig
from pallas_kernels.decode_attention_triton import AttentionHeuristics
from pallas_kernels.gather_matmul import gather_matmul_cols
from pallas_kernels.paged_decode_attention import selective_paged_decode_attention
from pallas_kernels.paged_decode_attention_triton import PagedAttentionConfig
from pallas_kernels.paged_decode_attention_triton import PagedAttentionHeuristics
from pallas_kernels.gather_matmul import gather_matmul_rows
from pallas_kernels.gather_matmul_triton import GatherConfig
from pallas_kernels.gather_matmul_triton import GatherHeuristics
from pallas_kernels.rope_append import rope_append
from pallas_kernels.skinny_matmul import MatmulConfig
from pallas_kernels.skinny_matmul import MatmulOut
from pallas_kernels.skinny_matmul import RmsInput
from pallas_kernels.skinny_matmul import Side
from pallas_kernels.skinny_matmul_xla import GLU_ACTIVATIONS
from pallas_kernels.skinny_matmul import skinny_matmul
from pallas_kernels.skinny_matmul_triton import MatmulHeuristics
from pallas_kernels.topk_select import topk_select
from pallas_kernels.topk_select_triton import TopkHeuristics

__all__ = [
    "AttentionConfig",
    "AttentionHeuristics",
    "GLU_ACTIVATIONS",
    "GatherConfig",
    "GatherHeuristics",
    "MatmulConfig",
    "MatmulHeuristics",
    "MatmulOut",
    "PagedAttentionConfig",
    "PagedAttentionHeuristics",
    "RmsInput",
    "Side",
    "TopkHeuristics",
    "gather_matmul_cols",
    "gather_matmul_rows",
    "merge_attention_partials",
    "rope_append",
    "selective_decode_attention",
    "selective_decode_attention_append",
    "selective_paged_decode_attention",
    "skinny_matmul",
    "topk_select",
]
