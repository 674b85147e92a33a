"""How the decode step is compiled: `DecodeOptions`, a frozen, hashable dataclass.

Every field is part of the compiled program's static key (it is a field of the static decode-step objects,
`polar_jax.generation.DenseDecode` and `polar_jax.sparse_decode.SparseDecode`), so a different option compiles a
different program and nothing is read from module globals at trace time.

    out = polar_jax.generate(model, prompts, max_new_tokens=64,
                             options=polar_jax.DecodeOptions(kernels="xla"))

The defaults are the measured winners on an H100 (`benchmarks/NOTES.md`); the other settings exist for A/B
measurements and for platforms where a kernel is not wanted.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

from polar_jax.kv_cache import KV_DTYPES

KERNELS = ("auto", "pallas", "xla")
UNION_DTYPES = ("bfloat16", "float32")
UNION_METHODS = ("radix", "sort")


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """Choices of the decode step (all static: changing one compiles a new program).

  Attributes:
    kernels: "auto" (Pallas kernels on GPU, their XLA references elsewhere), "pallas" (the kernels everywhere; on
      CPU they run in Pallas interpret mode, slowly) or "xla" (the XLA references everywhere).
    fused_projections: the decode step's projections on `pallas_kernels.skinny_matmul`, one kernel per projection
      that streams the weight once with bias, activation, gated product and residual add in its epilogue (off:
      XLA's dots and fusions). Applies on one device; under tensor parallelism XLA's dots run.
    deferred_norm: the RMSNorms of pre-norm layers run inside the projection kernels around them (o_proj /
      down_proj write `h * g` and h's squares, the next kernel scales its rows). Needs `fused_projections`.
    router_in_qkv: a linear head router's scores and per-row top-k come from extra programs of the q|k|v kernel
      instead of their own dot. Needs `fused_projections`.
    union_dtype: the dtype the batch-union neuron scores (ReLU MLPs) are ranked in: "bfloat16" (two radix passes)
      or "float32" (four).
    union_method: the batch-union neuron selection: "radix" (sort-free, ascending indices) or "sort"
      (`lax.top_k`); the same set either way.
    loop_graph: on GPU, the whole `generate` decode loop as one CUDA graph (XLA command buffers with WHILE and
      CONDITIONAL); ignored elsewhere and when the user's XLA_FLAGS set the command-buffer kinds.
    kv_dtype: the KV cache's storage: None (the model's dtype; its name is accepted too), "int8" or
      "float8_e4m3fn" (8 bits with one float32 scale per token and KV group, `polar_jax.kv_cache.QuantizedKV`: half
      the cache bytes; one device).
  """

  kernels: Literal["auto", "pallas", "xla"] = "auto"
  fused_projections: bool = True
  deferred_norm: bool = True
  router_in_qkv: bool = True
  union_dtype: Literal["bfloat16", "float32"] = "bfloat16"
  union_method: Literal["radix", "sort"] = "radix"
  loop_graph: bool = True
  kv_dtype: Literal[None, "bfloat16", "float16", "float32", "int8", "float8_e4m3fn"] = None

  def __post_init__(self):
    _check_choice("kernels", self.kernels, KERNELS)
    if self.kv_dtype is not None:
      _check_choice("kv_dtype", self.kv_dtype, KV_DTYPES)
    _check_choice("union_dtype", self.union_dtype, UNION_DTYPES)
    _check_choice("union_method", self.union_method, UNION_METHODS)
    for name in ("fused_projections", "deferred_norm", "router_in_qkv", "loop_graph"):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f"DecodeOptions.{name} must be True or False, got {getattr(self, name)!r}")
    needs = [name for name in ("deferred_norm", "router_in_qkv") if getattr(self, name)]
    if needs and not self.fused_projections:
      raise ValueError(f"DecodeOptions({', '.join(f'{n}=True' for n in needs)}) needs fused_projections=True "
                       "(they run inside the projection kernels); pass "
                       f"DecodeOptions(fused_projections=False, {', '.join(f'{n}=False' for n in needs)})")

  @property
  def implementation(self) -> str | None:
    """The kernels' `implementation=` argument: None (best for the platform), "pallas" or "xla"."""
    return None if self.kernels == "auto" else self.kernels

  @property
  def union_jnp_dtype(self):
    return jnp.bfloat16 if self.union_dtype == "bfloat16" else jnp.float32

  def replace(self, **changes) -> "DecodeOptions":
    return dataclasses.replace(self, **changes)


def check_options(options) -> DecodeOptions:
  """`options`, or the defaults for None; TypeError for anything else."""
  if options is None:
    return DecodeOptions()
  if not isinstance(options, DecodeOptions):
    raise TypeError(f"options must be a polar_jax.DecodeOptions, got {type(options).__name__}")
  return options


def _check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"DecodeOptions.{name} must be one of {choices}, got {value!r}")
