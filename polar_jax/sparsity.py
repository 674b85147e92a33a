"""Polar Sparsity settings: which KV groups (and, on ReLU MLPs, which neurons) a decode step computes.

    cfg = SparsityConfig(attn_density=0.5)                 # half the KV groups per row, layer 0 dense
    out = polar_jax.generate(model, prompts, max_new_tokens=64, sparsity=cfg,
                             routers=polar_jax.load_routers(DIR, model))

Semantics (decode only; prefill is always dense; K/V of every head is always written to the cache):
  * groups kept per row and layer = `round_half_up(density * num_kv_heads)`, at least 1
    (0.67 of 3 keeps 2, 0.5 of 32 keeps 16, 0.625 of 8 keeps 5); `attn_groups` gives the count directly;
  * `dense_layers` keep all groups (default: layer 0, as in the paper); `per_layer` maps layer -> density and
    overrides both the global density and `dense_layers` for the layers it names;
  * a layer whose count equals `num_kv_heads` runs exactly the dense path (no router, no selection);
  * `selector`: "router" (learned head routers, top-k of their scores per row), "oracle" (dense attention, then
    each row keeps its top-k groups by true output norm; an evaluation upper bound) or "random" (a seeded
    uniform choice per row, layer and step; a baseline). Only "router" needs routers;
  * `mlp="router"` (ReLU MLPs only, i.e. OPT): the batch-union neuron set from the neuron routers, with the
    per-layer top-k of the routers' calibration table for the batch size; layers whose k exceeds
    `mlp_dense_above` x N (default 0.6; the paper's 0.8 measured 1.7% slower, see `DENSE_FALLBACK_FRACTION`) run
    the dense MLP with no router. The MLP setting does not depend on `selector`;
  * `router_dtype`: the routers' weights in the decode step: None (the model's dtype), "float32", "bfloat16",
    "float16" or "int8" (neuron routers as int8 with a scale per output column, half the bytes of bf16; head
    routers, a few columns wide, then stay in the model's dtype);
  * `budget`: "uniform" (every row keeps the layer's k groups) or "adaptive": the layer's k is the most a row keeps
    (Kmax; a layer at density 1.0 then still routes, with Kmax = all groups), and each row keeps the smallest
    number of its top groups whose share of the selector's group weights reaches `mass` (router: the softmax of
    its group scores; oracle: each group's output norm over the sum of norms), at least `min_groups`. `mass` is
    one number or one per layer (`polar_jax.routers.adaptive.calibrate_mass` finds it for a target average
    density). Counts are data, not shapes: they change per row and step without recompiling. Selectors
    "router" and "oracle". With balanced per-shard selection (`shards`, tensor parallelism) each shard keeps
    the fewest of its k / shards groups whose share of its own block of groups reaches `mass`.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from typing import Any

from polar_jax.config import ModelConfig

SELECTORS = ("router", "oracle", "random")
MLP_MODES = ("dense", "router")
# Default `mlp_dense_above`: a neuron budget above this fraction of N runs the dense MLP. A routed layer pays for its
# router (OPT-6.7B, rank 1024: 42 MB of bf16 weights, ~2.6k neurons' rows) and the union selection (~20 us on an
# H100) to skip N - k neurons, so it only gains while k stays well below N: OPT-6.7B B32 heads 0.5 + MLP union
# measured 2958.2 tok/s at 0.6 vs 2908.4 at the paper's 0.8 (0.5: 2948.9; benchmarks/NOTES.md).
DENSE_FALLBACK_FRACTION = 0.6
ROUTER_DTYPES = ("float32", "bfloat16", "float16", "int8")
BUDGETS = ("uniform", "adaptive")


def round_half_up(x: float) -> int:
  """Nearest integer, halves rounded up (tolerant to float error: 0.5 * 3 -> 2, 0.625 * 8 -> 5)."""
  return int(math.floor(x + 0.5 + 1e-9))


def groups_for_density(density: float, num_groups: int) -> int:
  """KV groups kept at `density`: round_half_up(density * num_groups), at least 1."""
  _check_density(density, "density")
  return max(1, min(num_groups, round_half_up(density * num_groups)))


def _check_density(d: Any, what: str) -> None:
  if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < float(d) <= 1.0:
    raise ValueError(f"{what} must be a number in (0, 1] (the fraction of KV groups kept), got {d!r}")


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
  """Decode-time sparsity (frozen and hashable: it is part of the compiled program).

  Attributes:
    attn_density: fraction of KV groups each row attends to, in (0, 1].
    attn_groups: number of KV groups kept per row (overrides `attn_density`), or None.
    dense_layers: layers whose attention stays dense.
    per_layer: `{layer: density}` (or `((layer, density), ...)`), normalised to a sorted tuple of pairs.
    mlp: "dense" or "router" (batch-union neuron sparsity, ReLU MLPs only).
    selector: "router", "oracle" or "random" (see the module docstring).
    seed: seed of the "random" selector.
    mlp_dense_above: with `mlp="router"`, a layer whose neuron budget exceeds this fraction of N runs the dense
      MLP (no router, no selection), in (0, 1].
    router_dtype: the routers' weights in the decode step (see the module docstring), or None.
    budget: "uniform" or "adaptive" (see the module docstring).
    mass: with `budget="adaptive"`, the share of the group weights each row's kept groups reach, in (0, 1]: one
      number, or a tuple with one per layer (entries of dense layers are ignored).
    min_groups: with `budget="adaptive"`, the fewest groups a row keeps (capped at the layer's k), >= 1.
  """

  attn_density: float = 1.0
  attn_groups: int | None = None
  dense_layers: tuple[int, ...] = (0,)
  per_layer: tuple[tuple[int, float], ...] | None = None
  mlp: str = "dense"
  selector: str = "router"
  seed: int = 0
  mlp_dense_above: float = DENSE_FALLBACK_FRACTION
  router_dtype: str | None = None
  # Balanced per-shard selection (polar_jax.sharding): split the KV groups into `shards` equal blocks and keep
  # round(density x groups per block) in each. None: the model's tensor-parallel degree (1 on one device).
  shards: int | None = None
  budget: str = "uniform"
  mass: float | tuple[float, ...] = 0.9
  min_groups: int = 1

  def __post_init__(self):
    if self.budget not in BUDGETS:
      raise ValueError(f"unknown budget {self.budget!r}; expected one of {BUDGETS}")
    if isinstance(self.mass, (list, tuple)):
      masses = tuple(self.mass)
      if not masses:
        raise ValueError("mass must be a number in (0, 1] or a non-empty sequence of them (one per layer)")
      for i, m in enumerate(masses):
        _check_mass(m, f"mass of layer {i}")
      object.__setattr__(self, "mass", tuple(float(m) for m in masses))
    else:
      _check_mass(self.mass, "mass")
      object.__setattr__(self, "mass", float(self.mass))
    if isinstance(self.min_groups, bool) or not isinstance(self.min_groups, int) or self.min_groups < 1:
      raise ValueError(f"min_groups must be an integer >= 1, got {self.min_groups!r}")
    if self.budget == "adaptive":
      if self.selector not in ("router", "oracle"):
        raise ValueError(f"budget='adaptive' needs selector 'router' or 'oracle' (scores to take a mass of), got "
                         f"{self.selector!r}")
    if self.shards is not None and (isinstance(self.shards, bool) or not isinstance(self.shards, int)
                                    or self.shards < 1):
      raise ValueError(f"shards must be an integer >= 1 or None, got {self.shards!r}")
    _check_density(self.attn_density, "attn_density")
    if self.attn_groups is not None and (isinstance(self.attn_groups, bool) or
                                         not isinstance(self.attn_groups, int) or self.attn_groups < 1):
      raise ValueError(f"attn_groups must be an integer >= 1 (KV groups kept per row), got {self.attn_groups!r}")
    if self.selector not in SELECTORS:
      raise ValueError(f"unknown selector {self.selector!r}; expected one of {SELECTORS}")
    if self.mlp not in MLP_MODES:
      raise ValueError(f"unknown mlp mode {self.mlp!r}; expected one of {MLP_MODES}")
    object.__setattr__(self, "dense_layers", tuple(sorted({int(i) for i in self.dense_layers})))
    if self.per_layer is not None:
      items = self.per_layer.items() if isinstance(self.per_layer, Mapping) else self.per_layer
      pairs = tuple(sorted((int(layer), float(d)) for layer, d in items))
      for layer, d in pairs:
        _check_density(d, f"per_layer density of layer {layer}")
      if len({layer for layer, _ in pairs}) != len(pairs):
        raise ValueError(f"per_layer names a layer twice: {pairs}")
      object.__setattr__(self, "per_layer", pairs or None)
    object.__setattr__(self, "seed", int(self.seed))
    d = self.mlp_dense_above
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < float(d) <= 1.0:
      raise ValueError(f"mlp_dense_above must be a number in (0, 1] (the fraction of the MLP's neurons above which "
                       f"a layer runs dense), got {d!r}")
    object.__setattr__(self, "mlp_dense_above", float(d))
    if self.router_dtype is not None and self.router_dtype not in ROUTER_DTYPES:
      raise ValueError(f"unknown router_dtype {self.router_dtype!r}; expected None or one of {ROUTER_DTYPES}")

  # ---- resolution against a model -------------------------------------------------------------
  def layer_groups(self, config: ModelConfig, shards: int | None = None) -> tuple[int | None, ...]:
    """Per layer: the number of KV groups kept per row, or None where the layer runs dense attention.

    `shards > 1` (balanced per-shard selection; default `self.shards`): `shards x` the count kept in each of
    `shards` equal blocks of `num_kv_heads / shards` groups, each computed as above (round_half_up(density x
    block), at least 1)."""
    shards = shards or self.shards or 1
    if shards > 1:
      if config.num_kv_heads % shards:
        raise ValueError(f"balanced selection over {shards} shards needs the {config.num_kv_heads} KV groups to "
                         "divide evenly")
      local = types.SimpleNamespace(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads // shards)
      per = dataclasses.replace(self, shards=None, attn_groups=None if self.attn_groups is None else
                                max(1, round_half_up(self.attn_groups / shards)))
      return tuple(None if k is None else k * shards for k in per.layer_groups(local))
    num_layers, g = config.num_layers, config.num_kv_heads
    if self.attn_groups is not None and self.attn_groups > g:
      raise ValueError(f"attn_groups={self.attn_groups} exceeds the model's {g} KV groups")
    named = set(self.dense_layers) | {layer for layer, _ in self.per_layer or ()}
    bad = sorted(i for i in named if not 0 <= i < num_layers)
    if bad:
      raise ValueError(f"layer indices {bad} out of range for a model with {num_layers} layers")
    default = self.attn_groups if self.attn_groups is not None else groups_for_density(self.attn_density, g)
    out = [None if i in self.dense_layers else default for i in range(num_layers)]
    for layer, d in self.per_layer or ():
      out[layer] = groups_for_density(d, g)
    if self.budget == "adaptive":   # the layer's k is the most a row keeps; all groups still route
      return tuple(None if k is None else int(min(k, g)) for k in out)
    return tuple(None if k is None or k >= g else int(k) for k in out)

  def layer_masses(self, config: ModelConfig) -> tuple[float | None, ...] | None:
    """Per layer with `budget="adaptive"`: the mass threshold of its rows, or None where the layer runs dense.
    None for the uniform budget."""
    if self.budget != "adaptive":
      return None
    groups = self.layer_groups(config)
    masses = self.mass if isinstance(self.mass, tuple) else (self.mass,) * config.num_layers
    if len(masses) != config.num_layers:
      raise ValueError(f"mass has {len(masses)} per-layer values for a model with {config.num_layers} layers")
    return tuple(None if k is None else m for k, m in zip(groups, masses))

  def is_dense(self, config: ModelConfig) -> bool:
    """True when this config computes exactly the dense decode step for `config`."""
    return self.mlp == "dense" and all(k is None for k in self.layer_groups(config))

  def check_mlp(self, config: ModelConfig) -> None:
    """Raises ValueError when `mlp="router"` is asked of a model without a ReLU neuron MLP."""
    if self.mlp == "router" and not (config.mlp == "relu_mlp" and config.activation == "relu"):
      raise ValueError(
          f"mlp='router' needs a ReLU fc1/fc2 MLP (OPT); this {config.model_type} model has a "
          f"{config.mlp} {config.activation} MLP, whose activations are not sparse. Use mlp='dense'.")


def _check_mass(m: Any, what: str) -> None:
  if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 < float(m) <= 1.0:
    raise ValueError(f"{what} must be a number in (0, 1] (the share of the group weights a row keeps), got {m!r}")


def neuron_budgets(table: Mapping[int, tuple[int, ...]], batch: int, num_neurons: int,
                   dense_above: float = DENSE_FALLBACK_FRACTION) -> tuple[int | None, ...]:
  """Per-layer neuron top-k for a decode batch of `batch` rows from a calibration table.

  Args:
    table: `{batch_size: (k_layer0, k_layer1, ...)}` (calibrated batch sizes, e.g. 1, 2, 4, ..., 256).
    batch: rows decoded together.
    num_neurons: N, the MLP width.
    dense_above: budgets above `dense_above * N` run the dense MLP.

  Returns:
    Per layer: k, or None where the MLP runs dense (k > dense_above * N). The smallest calibrated batch size >= `batch`
    is used; beyond the largest calibrated size every layer runs dense.
  """
  sizes = sorted(b for b in table if b >= batch)
  if not sizes:
    return tuple(None for _ in table[max(table)])
  return tuple(None if k > dense_above * num_neurons else int(k) for k in table[sizes[0]])
