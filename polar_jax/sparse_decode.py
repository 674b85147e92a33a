"""The decode-step objects: `DenseDecode` and the Polar Sparsity step `SparseDecode`, and `make_decoder`.

Both are hashable, frozen dataclasses: a static argument of the jitted programs (`polar_jax.generation`, the
serving engine), with their `DecodeOptions` and tensor-parallel mesh as fields, so a different option or mesh
compiles a different program. They are called as `decode(model, tok_b, cache, decode_state, active_b)` and return
`(logits [B, V], cache)`. `make_decoder(model, sparsity, routers, batch=...)` returns `(decode, decode_state)`:
everything that fixes shapes (groups kept per layer, neuron budgets, which routers run) is in `decode` (static);
router weights are in `decode_state` (dynamic), so new router weights do not recompile.

Per decode step and layer (prefill stays dense; K/V of every head is written to the cache), `SparseDecode.plans`
builds a `polar_jax.selection.LayerPlan`:
  1. heads: the layer's pre-attention normed input `x_bd` -> group scores (a `LinearRouter`: a dot in the model's
     dtype with float32 accumulation, or extra programs of the q|k|v kernel; the random selector's seeded scores)
     -> per-row top-k (`polar_jax.sharding.balanced_topk`: `lax.top_k`'s indices without a sort) ->
     `selective_decode_attention` over those groups -> dense o_proj; the oracle runs dense attention and keeps
     each row's top-k groups by output norm instead;
  2. ReLU MLPs with `mlp="router"`: a `NeuronUnion`: neuron logits -> `sum_b active_b * relu(logits)` -> top-k set
     with the layer's static budget (`pallas_kernels.topk_select`; indices ascending) -> gathered fc1/fc2 matmuls;
     layers over budget run the dense MLP.
Tensor parallel (`polar_jax.sharding`, `shards > 1`): both selections are balanced per shard: each of the tp
shards keeps k / tp of its own KV groups (resp. ceil(k / tp) of its own neurons), not a global top-k.
Adaptive budgets (`masses`): the layer's k is the most a row keeps; the plan also carries the layer's mass, and
each row's count of kept groups (`GroupIndices.count_b`) is computed in the step from its scores, so it changes
per row and step within one compiled program.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.skinny_matmul import side_width
from polar_jax.options import DecodeOptions, check_options
from polar_jax.routers.modules import decode_head_layers, decode_neuron_layers
from polar_jax.selection import (DENSE_PLAN, GroupIndices, LayerPlan, LinearRouter, NeuronUnion, OracleHeads)
from polar_jax.sharding import balanced_topk, mesh_tp, model_mesh
from polar_jax.sparsity import SparsityConfig, neuron_budgets


@dataclasses.dataclass(frozen=True)
class DenseDecode:
  """The dense decode step (hashable, so it can be a static jit argument).

  Called as `decode(model, tok_b, cache, decode_state, active_b)` like `SparseDecode`; the dense step ignores the
  last two.
  """

  options: DecodeOptions = DecodeOptions()
  mesh: jax.sharding.Mesh | None = None

  def __call__(self, model, tok_b, cache, decode_state=None, active_b=None):
    return model.decode_step(tok_b, cache, options=self.options, mesh=self.mesh)


def random_scores(seed: int, layer: int, positions_b: jax.Array, tokens_b: jax.Array, num_groups: int):
  """Uniform `[B, G]` scores keyed by (seed, layer, position, token): per row, layer and step, and
  independent of the row's place in the batch (a row decodes the same alone or batched)."""
  base = jax.random.fold_in(jax.random.key(seed), layer)

  def row(pos, tok):
    return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(base, pos), tok), (num_groups,))

  return jax.vmap(row)(positions_b, tokens_b)


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
    shards: balanced per-shard selection over this many blocks of groups (`polar_jax.sharding`).
    masses: adaptive budgets: per layer the mass threshold of its rows (None for a dense layer), with `groups`
      the most groups a row keeps; None: every row keeps exactly `groups` (the uniform budget).
    min_groups: with `masses`, the fewest groups a row keeps.
    options: the step's `DecodeOptions`.
    mesh: the tensor-parallel mesh of the model, or None.
  """

  groups: tuple[int | None, ...]
  selector: str = "router"
  seed: int = 0
  neuron_k: tuple[int | None, ...] | None = None
  head_router: bool = False
  shards: int = 1
  options: DecodeOptions = DecodeOptions()
  mesh: jax.sharding.Mesh | None = None
  masses: tuple[float | None, ...] | None = None
  min_groups: int = 1

  def plans(self, model, tok_b, positions_b, router_state=None, active_b=None) -> tuple[LayerPlan, ...]:
    """What each layer computes in this step (positions_b: the cache lengths before the step). Public so that one
    layer can be run or its routers timed alone with exactly the step's selection (`benchmarks/layer.py`)."""
    head = router_state["head"] if self.head_router else None            # per layer: (w_dg, b_g) or None
    head_side = router_state.get("head_side") if self.head_router else None   # the same, zero-padded columns
    neuron = None if self.neuron_k is None else router_state["neuron"]   # per layer: its own weight arrays
    num_groups = model.config.num_kv_heads
    plans = []
    for layer in range(len(model.layers)):
      k = self.groups[layer]
      mass = None if self.masses is None else self.masses[layer]
      if k is None:
        heads = DENSE_PLAN.heads
      elif self.selector == "oracle":              # Attention.decode: dense, then top-k by output norm
        heads = OracleHeads(k, self.shards, mass, self.min_groups)
      elif self.selector == "random":
        scores_bg = random_scores(self.seed, layer, positions_b, tok_b, num_groups)
        heads = GroupIndices(balanced_topk(scores_bg, k, self.shards))
      else:
        side = head_side[layer] if head_side is not None else None
        heads = LinearRouter(*head[layer], k=k, shards=self.shards, side=side, mass=mass,
                             min_groups=self.min_groups)
      neurons = None
      if self.neuron_k is not None and self.neuron_k[layer] is not None:
        neurons = NeuronUnion(neuron[layer], self.neuron_k[layer], active_b, self.shards)
      plans.append(LayerPlan(heads, neurons))
    return tuple(plans)

  def __call__(self, model, tok_b, cache, router_state=None, active_b=None):
    plans = self.plans(model, tok_b, cache.lengths_b, router_state, active_b)
    return model.decode_step(tok_b, cache, plans, options=self.options, mesh=self.mesh)


def make_decoder(model, sparsity: SparsityConfig | None, routers=None, *, batch: int = 1,
                 options: DecodeOptions | None = None, router_dtype=None):
  """The decode step and its dynamic state for `generate`/`stream`.

  Args:
    model: the `CausalLM`.
    sparsity: a `SparsityConfig`, or None for dense decoding.
    routers: `polar_jax.routers.Routers` (needed by selector "router" and by mlp "router").
    batch: rows decoded together (selects the neuron budgets).
    options: the step's `DecodeOptions` (None: the defaults).
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
  options = check_options(options)
  mesh = model_mesh(model)
  dense = DenseDecode(options, mesh)
  if sparsity is None:
    if routers is not None:
      raise ValueError("routers were given without sparsity: pass sparsity=SparsityConfig(attn_density=...)")
    return dense, None
  if not isinstance(sparsity, SparsityConfig):
    raise TypeError(f"sparsity must be a polar_jax.SparsityConfig, got {type(sparsity).__name__}")
  sparsity.check_mlp(config)
  shards = _selection_shards(mesh, sparsity)
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
    return dense, None
  state = {}
  model_dtype = jnp.dtype(getattr(model, "dtype", jnp.float32))
  router_dtype = router_dtype if router_dtype is not None else sparsity.router_dtype
  dtype = jnp.dtype(router_dtype) if router_dtype is not None else model_dtype
  if needs_head:   # int8 is for the neuron routers; the head routers (a few columns) keep the model's dtype
    state["head"] = decode_head_layers(routers.head, [k is not None for k in groups],
                                       model_dtype if dtype == jnp.int8 else dtype)
    if shards == 1:   # for the fused q|k|v kernel's side programs (`LinearRouter.side`)
      state["head_side"] = tuple(None if wb is None else _side_copy(*wb) for wb in state["head"])
  if neuron_k is not None:
    state["neuron"] = decode_neuron_layers(routers.neuron, [k is not None for k in neuron_k], dtype)
  masses = sparsity.layer_masses(config)
  decode = SparseDecode(groups, sparsity.selector, sparsity.seed, neuron_k, needs_head, shards, options, mesh,
                        masses, sparsity.min_groups if masses is not None else 1)
  return decode, state


def _side_copy(w_dg, b_g):
  """`(w, b)` with `skinny_matmul.side_width(G)` columns, zeros past G (the same arrays when G is that wide).
  Narrower side weights were read by unpipelined gathers: Llama-3.1-8B B32 (G = 8) q|k|v 32.9 vs 21.0 us per
  layer on an H100."""
  pad = side_width(w_dg.shape[1]) - w_dg.shape[1]
  if pad == 0:
    return w_dg, b_g
  return jnp.pad(w_dg, ((0, 0), (0, pad))), jnp.pad(b_g, (0, pad))


def _selection_shards(mesh, sparsity: SparsityConfig) -> int:
  """Blocks of the balanced per-shard group selection: `sparsity.shards`, else the model's tp (1 unsharded)."""
  tp = mesh_tp(mesh)
  if sparsity.shards is not None and tp > 1 and sparsity.shards != tp:
    raise ValueError(f"SparsityConfig(shards={sparsity.shards}) differs from the model's tensor parallelism "
                     f"tp={tp}; leave shards=None under tp")
  return sparsity.shards if sparsity.shards is not None else tp
