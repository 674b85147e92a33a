"""The Polar Sparsity decode step: a hashable static object plus a dynamic router-state pytree.

`make_decoder(model, sparsity, routers, batch)` returns `(decode, decode_state)`; the generation program
calls `decode(model, tok_b, cache, decode_state, active_b)` inside its jitted `lax.while_loop`. Everything
that fixes shapes (groups kept per layer, neuron budgets, which routers run) is in `decode`
(static); router weights are in `decode_state` (dynamic), so new router weights do not recompile.

Per decode step and layer (prefill stays dense; K/V of every head is written to the cache):
  1. the layer's pre-attention normed input `x_bd` -> group scores (router: a dot in the model's dtype with
     float32 accumulation, `routers.modules.decode_head_scores`; or random) -> per-row top-k
     (`polar_jax.sharding.balanced_topk` -> `polar_jax.topk.rank_topk`: `lax.top_k`'s indices without a sort;
     one block of groups off tensor parallel) -> `selective_decode_attention` over
     those groups -> dense o_proj;
     the oracle runs dense attention and keeps each row's top-k groups by output norm instead;
  2. ReLU MLPs with `mlp="router"`: neuron logits (router weights in the model's dtype, float32 accumulation)
     -> `sum_b active_b * relu(logits)` (on one device in the router kernel's epilogue, `UNION_IN_ROUTER`) -> top-k
     set with the layer's static budget (sort-free:
     `pallas_kernels.topk_select`; indices ascending) -> gathered fc1/fc2 matmuls (biases included); layers over
     budget run the dense MLP.
Tensor parallel (`polar_jax.sharding`, `shards > 1`): both selections are balanced per shard: each of the tp
shards keeps k / tp of its own KV groups (resp. ceil(k / tp) of its own neurons), not a global top-k.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.skinny_matmul import side_width
from polar_jax import layers
from polar_jax.routers.modules import (decode_head_layers, decode_head_scores, decode_neuron_layers,
                                       decode_neuron_logits, decode_neuron_union)
from polar_jax.sharding import balanced_topk, balanced_union_topk, model_mesh, model_tp, sharded_sparse_mlp
from polar_jax.sparsity import SparsityConfig, neuron_budgets
from polar_jax.topk import METHODS as UNION_METHODS, topk_rows, union_dtype, union_scores

# One device, float neuron routers, `layers.DECODE_MATMUL`: the batch-union scores come out of the router's
# up-projection kernel (bias, ReLU and the active rows' column sums in its epilogue: `decode_neuron_union`), so
# the [B, N] float32 logits are never written and no reduce kernel follows (off: XLA's dots and union fusion).
UNION_IN_ROUTER = True


def random_scores(seed: int, layer: int, positions_b: jax.Array, tokens_b: jax.Array, num_groups: int):
  """Uniform `[B, G]` scores keyed by (seed, layer, position, token): per row, layer and step, and
  independent of the row's place in the batch (a row decodes the same alone or batched)."""
  base = jax.random.fold_in(jax.random.key(seed), layer)

  def row(pos, tok):
    return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(base, pos), tok), (num_groups,))

  return jax.vmap(row)(positions_b, tokens_b)


def union_topk(logits_bn: jax.Array, active_b: jax.Array | None, k: int, method: str = "radix",
               implementation: str | None = None) -> jax.Array:
  """int32 `[k]`: the batch-union neuron set, top-k of `sum_b relu(logits)` over active rows (ties: lower
  index first). `method`: "radix" (default, sort-free, ascending indices: `pallas_kernels.topk_select` with
  `implementation`) or "sort" (`lax.top_k`, a full sort of the N scores on GPU for large k); the same set exactly
  (`polar_jax.topk.topk_rows`)."""
  return topk_rows(union_scores(logits_bn, active_b)[None], k, method, implementation)[0]


@dataclasses.dataclass(frozen=True)
class SparseDecode:
  """One sparse decode step (hashable: a static argument of the jitted generation program).

  Attributes:
    groups: per layer, KV groups kept per row, or None for dense attention.
    selector: "router", "oracle" or "random".
    seed: seed of the random selector.
    neuron_k: per layer, the neuron budget (None: dense MLP), or None for dense MLPs everywhere. With
      budgets, `router_state["neuron"]` holds per layer a `DecodeNeuronRouter` (None for a dense MLP):
      `routers.modules.decode_neuron_layers`, the weights cast once to the decode dtype (or int8).
    head_router: whether the step runs head routers; then `router_state["head"]` holds per layer `(w_dg, b_g)`
      (None for a dense layer): `routers.modules.decode_head_layers`, the weight cast once to the model's dtype.
    implementation: kernel implementation ("pallas", "xla" or None = best for the platform).
    union_method: how the batch-union neuron set is selected (`union_topk`): "radix" or "sort".
  """

  groups: tuple[int | None, ...]
  selector: str = "router"
  seed: int = 0
  neuron_k: tuple[int | None, ...] | None = None
  head_router: bool = False
  implementation: str | None = None
  shards: int = 1   # balanced per-shard selection over this many blocks of groups (polar_jax.sharding)
  union_method: str = "radix"

  def hooks(self, model, tok_b, positions_b, router_state=None, active_b=None) -> "StepHooks":
    """The per-layer hooks `__call__` gives `model.decode_step` (positions_b: the cache lengths before the
    step). Public so that one layer can be run or its routers timed alone with exactly the step's selection
    (`benchmarks/layer.py`)."""
    head = router_state["head"] if self.head_router else None   # per layer: (w_dg, b_g) or None
    head_side = router_state.get("head_side") if self.head_router else None   # the same, zero-padded columns
    neuron = None if self.neuron_k is None else router_state["neuron"]   # per layer: its own weight arrays
    num_groups = model.config.num_kv_heads

    def top_groups(scores_bg, layer):
      # per-row top-k (`rank_topk`, lax.top_k's indices); tensor parallel: k / shards groups of each shard
      return balanced_topk(scores_bg, self.groups[layer], self.shards)

    def selector(layer, x_bd):
      k = self.groups[layer]
      if k is None:
        return None
      if self.selector == "oracle":                # Attention.decode: dense, then top-k by output norm
        return (k, self.shards) if self.shards > 1 else k
      if self.selector == "random":
        scores_bg = random_scores(self.seed, layer, positions_b, tok_b, num_groups)
      else:
        scores_bg = decode_head_scores(*head[layer], x_bd)
      return top_groups(scores_bg, layer)

    def plan(layer):
      """How the layer selects, for the decode step's fusions (`DecoderLayer.decode`): ("dense",) (no selection),
      ("linear", w_dg, b_g, pick, topk) (the selector's own scores = normed x @ w + b, then `pick(scores)`: the
      q|k|v kernel can compute the scores itself; `topk=(G, k)` when pick is the plain per-row top-k of the first
      G scores, which the kernel can also take; None under balanced tensor-parallel selection), or ("x",) (the
      selector needs the normed input: call it)."""
      if self.groups[layer] is None:
        return ("dense",)
      if self.selector == "router":   # the zero-padded copy where there is one: the side programs read whole tiles
        topk = (num_groups, self.groups[layer]) if self.shards == 1 else None
        return ("linear", *(head_side or head)[layer], lambda scores_bp: top_groups(scores_bp[:, :num_groups], layer),
                topk)
      return ("x",)

    selector.plan = plan

    def select_neurons(layer, x_bd):
      k, router = self.neuron_k[layer], neuron[layer]
      if self.shards == 1 and UNION_IN_ROUTER and layers.DECODE_MATMUL and router.s_down_r is None:
        scores_n = decode_neuron_union(router, x_bd, active_b, union_dtype(), self.implementation)
        return topk_rows(scores_n[None], k, self.union_method, self.implementation)[0]
      logits_bn = decode_neuron_logits(router, x_bd)
      if self.shards > 1:                          # tensor parallel: a per-shard neuron union (polar_jax.sharding)
        return balanced_union_topk(logits_bn, active_b, k, self.shards, self.union_method, self.implementation)
      return union_topk(logits_bn, active_b, k, self.union_method, self.implementation)

    def mlp_override(layer):
      if self.neuron_k is None or self.neuron_k[layer] is None:
        return None
      mlp = model.layers[layer].mlp

      def sparse_mlp(y_bd, x_bd):
        idx_k = select_neurons(layer, x_bd)
        mesh = model_mesh(model) if self.shards > 1 else None
        if mesh is not None:
          return sharded_sparse_mlp(mlp, y_bd, idx_k, mesh=mesh, implementation=self.implementation)
        return mlp.sparse(y_bd, idx_k, implementation=self.implementation)

      return sparse_mlp

    return StepHooks(selector, mlp_override, select_neurons)

  def __call__(self, model, tok_b, cache, router_state=None, active_b=None):
    hooks = self.hooks(model, tok_b, cache.lengths_b, router_state, active_b)
    return model.decode_step(tok_b, cache, selector=hooks.selector, mlp_override=hooks.mlp_override,
                             implementation=self.implementation)


@dataclasses.dataclass(frozen=True)
class StepHooks:
  """One decode step's selection, per layer (built by `SparseDecode.hooks` inside the traced step).

  Attributes:
    selector: `(layer, x_bd) -> [B, K] group indices | None (dense) | oracle k`, `model.decode_step`'s selector.
    mlp_override: `layer -> None (dense MLP) | mlp_fn(y_bd, x_bd)`, `model.decode_step`'s mlp_override.
    select_neurons: `(layer, x_bd) -> [k] neuron indices`, the batch union the sparse MLP of a layer with a
      neuron budget gathers (only for such layers).
  """

  selector: Any
  mlp_override: Any
  select_neurons: Any


def make_decoder(model, sparsity: SparsityConfig | None, routers=None, *, batch: int = 1,
                 implementation: str | None = None, dense_factory=None, union_method: str = "radix",
                 router_dtype=None):
  """The decode step and its dynamic state for `generate`/`stream`.

  Args:
    model: the `CausalLM`.
    sparsity: a `SparsityConfig`, or None for dense decoding.
    routers: `polar_jax.routers.Routers` (needed by selector "router" and by mlp "router").
    batch: rows decoded together (selects the neuron budgets).
    implementation: kernel implementation for the sparse step.
    dense_factory: builds the dense step (default: `generation.DenseDecode`), used when nothing is sparse.
    union_method: the batch-union neuron selection, "radix" (default) or "sort" (`union_topk`; the same set).
    router_dtype: dtype of the head- and neuron-router weights in the decode step, overriding
      `sparsity.router_dtype` (default: the model's dtype, e.g. bf16: half the bytes of the float32 checkpoint,
      and the head router runs as one small GEMM; float32 accumulation either way). int8: the neuron routers
      quantized per output column (the head routers then take the model's dtype). The copy is made here, once
      per decoder, for the layers with a budget only; float32 keeps the routers' exact float32 scores.

  Returns:
    `(decode, decode_state)`. When the settings compute exactly the dense step (e.g. density 1.0 and
    dense MLPs), `decode` is the dense step itself, so the tokens are the dense path's.

  Raises:
    ValueError (RouterMismatchError for wrong routers) naming the problem.
  """
  config = model.config
  if dense_factory is None:
    from polar_jax.generation import DenseDecode as dense_factory
  if sparsity is None:
    if routers is not None:
      raise ValueError("routers were given without sparsity: pass sparsity=SparsityConfig(attn_density=...)")
    return dense_factory(), None
  if not isinstance(sparsity, SparsityConfig):
    raise TypeError(f"sparsity must be a polar_jax.SparsityConfig, got {type(sparsity).__name__}")
  sparsity.check_mlp(config)
  shards = _selection_shards(model, sparsity)
  groups = sparsity.layer_groups(config, shards)
  needs_head = sparsity.selector == "router" and any(k is not None for k in groups)
  needs_neuron = sparsity.mlp == "router"
  if (needs_head or needs_neuron) and routers is None:
    what = "selector='router'" if needs_head else "mlp='router'"
    raise ValueError(f"{what} needs trained routers: pass routers=polar_jax.load_routers(DIR, model) "
                     "(polar-generate: --routers DIR), or use selector='oracle' / 'random', which need none")
  if routers is not None:
    routers.check_model(config)
  neuron_k = None
  if needs_neuron:
    if routers.neuron is None or not routers.mlp_topk:
      raise ValueError("mlp='router' needs neuron routers with a calibrated top-k table; these routers have "
                       "none (train them on a ReLU model with polar-train-routers)")
    neuron_k = neuron_budgets(routers.mlp_topk, batch, config.intermediate_size, sparsity.mlp_dense_above)
    if shards > 1:   # per-shard union: ceil(k / shards) neurons from each shard's N / shards
      neuron_k = tuple(None if k is None else min(-(-k // shards), config.intermediate_size // shards) * shards
                       for k in neuron_k)
    if all(k is None for k in neuron_k):
      neuron_k = None
  if all(k is None for k in groups) and neuron_k is None:
    return dense_factory(), None
  if union_method not in UNION_METHODS:
    raise ValueError(f"unknown union_method {union_method!r}; expected one of {UNION_METHODS}")
  state = {}
  model_dtype = jnp.dtype(getattr(model, "dtype", jnp.float32))
  router_dtype = router_dtype if router_dtype is not None else sparsity.router_dtype
  dtype = jnp.dtype(router_dtype) if router_dtype is not None else model_dtype
  if needs_head:   # int8 is for the neuron routers; the head routers (a few columns) keep the model's dtype
    state["head"] = decode_head_layers(routers.head, [k is not None for k in groups],
                                       model_dtype if dtype == jnp.int8 else dtype)
    if shards == 1:   # for the fused q|k|v kernel's side programs (`selector.plan`)
      state["head_side"] = tuple(None if wb is None else _side_copy(*wb) for wb in state["head"])
  if neuron_k is not None:
    state["neuron"] = decode_neuron_layers(routers.neuron, [k is not None for k in neuron_k], dtype)
  decode = SparseDecode(groups, sparsity.selector, sparsity.seed, neuron_k, needs_head, implementation, shards,
                        union_method)
  return decode, state


def _side_copy(w_dg, b_g):
  """`(w, b)` with `skinny_matmul.side_width(G)` columns, zeros past G (the same arrays when G is that wide).
  Narrower side weights were read by unpipelined gathers: Llama-3.1-8B B32 (G = 8) q|k|v 32.9 vs 21.0 us per
  layer (benchmarks/NOTES.md, session 10)."""
  pad = side_width(w_dg.shape[1]) - w_dg.shape[1]
  if pad == 0:
    return w_dg, b_g
  return jnp.pad(w_dg, ((0, 0), (0, pad))), jnp.pad(b_g, (0, pad))


def _selection_shards(model, sparsity: SparsityConfig) -> int:
  """Blocks of the balanced per-shard group selection: `sparsity.shards`, else the model's tp (1 unsharded)."""
  tp = model_tp(model)
  if sparsity.shards is not None and tp > 1 and sparsity.shards != tp:
    raise ValueError(f"SparsityConfig(shards={sparsity.shards}) differs from the model's tensor parallelism "
                     f"tp={tp}; leave shards=None under tp")
  return sparsity.shards if sparsity.shards is not None else tp
