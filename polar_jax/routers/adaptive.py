"""Calibration of adaptive head budgets: the mass threshold that gives a requested average density.

With `SparsityConfig(budget="adaptive", mass=m)` each row keeps the fewest of its top groups whose share of the
softmax of its router's group scores reaches m (`polar_jax.selection.mass_counts`); the density a mass realises
depends on the routers and the text. `calibrate_mass` finds it on router scores of held-out tokens: the realised
density (kept groups / G, averaged over tokens and the routed layers) does not decrease as the mass grows, so a
bisection over the mass finds the threshold whose density is nearest the target, one mass for all layers or one
per layer. `heldout_router_scores` produces the scores (the dense model over text, the routers on each layer's
normed attention input, as a decode step sees it), `calibrate_adaptive` runs both on the router validation half of
the held-out passages (`polar-eval --budget adaptive --target-density D`), and `save_adaptive_budget` /
`load_adaptive_budget` keep the result beside the routers (`adaptive_budget.json`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from polar_jax.config import ModelConfig
from polar_jax.sparsity import SparsityConfig

BUDGET_FILE = "adaptive_budget.json"
BISECTION_STEPS = 40


@dataclasses.dataclass(frozen=True)
class AdaptiveBudget:
  """A calibrated adaptive budget.

  Attributes:
    target_density: the requested average density.
    mass: per layer, the mass threshold (1.0 for layers that run dense).
    max_groups: per layer, the most groups a row keeps (None: dense layer).
    min_groups: the fewest groups a row keeps.
    realised_density: the average density on the calibration tokens (kept groups / G over tokens and routed
      layers).
    layer_density: per layer, the realised density (None: dense layer).
    tokens: calibration tokens.
    per_layer: whether each layer has its own mass (else one mass for all).
    selector: "router" (shares of the softmax of the router scores) or "oracle" (shares of the summed group output
      norms, the upper bound).
    model: the fingerprint (`ModelConfig.fingerprint`) of the model calibrated on ("": not recorded). One folder
      can hold the budgets of several models (a model and its `--expand-kv` equivalent, say).
    shards: the balanced per-shard selection calibrated for (1: the global per-row top groups).
  """

  target_density: float
  mass: tuple[float, ...]
  max_groups: tuple[int | None, ...]
  min_groups: int
  realised_density: float
  layer_density: tuple[float | None, ...]
  tokens: int
  per_layer: bool = False
  selector: str = "router"
  model: str = ""
  shards: int = 1

  @property
  def avg_density(self) -> float:
    """The realised density over every layer, a dense layer counting 1 (as uniform budgets' `avg_density`)."""
    return float(np.mean([1.0 if d is None else d for d in self.layer_density]))

  def sparsity(self, base: SparsityConfig | None = None) -> SparsityConfig:
    """`base` (default `SparsityConfig()`) with this budget: adaptive, its masses and min_groups."""
    base = base or SparsityConfig()
    return dataclasses.replace(base, budget="adaptive", mass=self.mass, min_groups=self.min_groups,
                               selector=self.selector, shards=None if self.shards == 1 else self.shards)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "AdaptiveBudget":
    return cls(float(d["target_density"]), tuple(float(m) for m in d["mass"]),
               tuple(None if k is None else int(k) for k in d["max_groups"]), int(d["min_groups"]),
               float(d["realised_density"]), tuple(None if x is None else float(x) for x in d["layer_density"]),
               int(d["tokens"]), bool(d.get("per_layer", False)), str(d.get("selector", "router")),
               str(d.get("model", "")), int(d.get("shards", 1)))


def sorted_tail_shares(scores_tg: np.ndarray) -> np.ndarray:
  """float64 `[T, G - 1]`: per token, the softmax share of the groups after each rank (decreasing score order),
  summed from the smallest up (what a count leaves out; accurate where the share is tiny)."""
  s = np.asarray(scores_tg, np.float64)
  p = np.exp(s - s.max(axis=-1, keepdims=True))
  p /= p.sum(axis=-1, keepdims=True)
  p = -np.sort(-p, axis=-1)
  return np.cumsum(p[:, :0:-1], axis=-1)[:, ::-1]


def counts_for_mass(tail_tg: np.ndarray, mass: float, max_groups: int, min_groups: int = 1) -> np.ndarray:
  """int `[T]`: the groups each token keeps at `mass` (as `selection.mass_counts` on the top `max_groups`): the
  fewest whose left-out share is at most 1 - mass."""
  needed = 1 + np.sum(tail_tg[:, :max_groups - 1] > 1.0 - mass, axis=-1)
  return np.clip(needed, min(min_groups, max_groups), max_groups)


def _density(tails, masses, max_groups, min_groups, num_groups) -> float:
  return float(np.mean([counts_for_mass(c, m, k, min_groups).mean() / num_groups
                        for c, m, k in zip(tails, masses, max_groups)]))


def _bisect(density_of, target: float) -> float:
  """The mass in (0, 1] whose density is nearest `target` (density_of does not decrease with the mass)."""
  lo, hi = 0.0, 1.0
  if density_of(hi) <= target:
    return 1.0
  for _ in range(BISECTION_STEPS):
    mid = 0.5 * (lo + hi)
    if density_of(mid) < target:
      lo = mid
    else:
      hi = mid
  lo = max(lo, 1e-9)
  return lo if abs(density_of(lo) - target) < abs(density_of(hi) - target) else hi


def shard_blocks(scores_tlg: np.ndarray, max_groups: Sequence[int | None], shards: int
                 ) -> tuple[np.ndarray, tuple[int | None, ...]]:
  """Scores `[T, L, G]` and per-layer most groups as balanced selection over `shards` counts them: each shard's
  block of G / shards groups a token of its own (`[T x shards, L, G / shards]`, at most k / shards groups each).
  The mean density over the blocks is the density over all G groups."""
  t, num_layers, g = scores_tlg.shape
  if g % shards or any(k is not None and k % shards for k in max_groups):
    raise ValueError(f"balanced selection over {shards} shards needs the {g} groups and the most groups per layer "
                     f"{tuple(max_groups)} to divide by {shards}")
  blocks = scores_tlg.reshape(t, num_layers, shards, g // shards).transpose(0, 2, 1, 3)
  return blocks.reshape(t * shards, num_layers, g // shards), tuple(None if k is None else k // shards
                                                                      for k in max_groups)


def calibrate_mass(scores_tlg: np.ndarray, target_density: float, max_groups: Sequence[int | None], *,
                   min_groups: int = 1, per_layer: bool = False, selector: str = "router",
                   shards: int = 1) -> AdaptiveBudget:
  """The mass threshold(s) whose realised average density on `scores_tlg` is nearest `target_density`.

  Args:
    scores_tlg: router scores `[T, L, G]` of held-out tokens (`heldout_router_scores`).
    target_density: the requested average fraction of groups kept, in (0, 1]. Reachable between
      min_groups / G and max_groups / G; outside, the nearest end is returned (see `realised_density`).
    max_groups: per layer the most groups a row keeps (`SparsityConfig.layer_groups` of an adaptive config), None
      for a dense layer.
    min_groups: the fewest groups a row keeps.
    per_layer: one mass per layer, each layer at the target; else one mass whose average over the routed layers
      is at the target.
    selector: recorded in the budget ("oracle": `scores_tlg` are log group norms, `heldout_oracle_scores`).
    shards: balanced per-shard selection (`SparsityConfig.shards`): each shard counts its own block of groups
      (`shard_blocks`); `max_groups` are the totals over the shards.

  Raises:
    ValueError: bad target, shapes that disagree, or no routed layer.
  """
  if isinstance(target_density, bool) or not isinstance(target_density, (int, float)) or \
      not 0.0 < float(target_density) <= 1.0:
    raise ValueError(f"target_density must be a number in (0, 1], got {target_density!r}")
  scores_tlg = np.asarray(scores_tlg)
  if scores_tlg.ndim != 3 or scores_tlg.shape[0] == 0:
    raise ValueError(f"scores must be [tokens, layers, groups] with tokens > 0, got {scores_tlg.shape}")
  t, num_layers, g = scores_tlg.shape
  if len(max_groups) != num_layers:
    raise ValueError(f"max_groups has {len(max_groups)} entries for {num_layers} layers of scores")
  budget_groups = tuple(max_groups)
  if shards > 1:
    scores_tlg, max_groups = shard_blocks(scores_tlg, max_groups, shards)
    g = g // shards
  routed = [i for i, k in enumerate(max_groups) if k is not None]
  if not routed:
    raise ValueError("no routed layer to calibrate (every layer is dense)")
  target = float(target_density)
  tails = {i: sorted_tail_shares(scores_tlg[:, i]) for i in routed}
  masses = [1.0] * num_layers
  if per_layer:
    for i in routed:
      masses[i] = _bisect(lambda m, i=i: _density([tails[i]], [m], [max_groups[i]], min_groups, g), target)
  else:
    ks = [max_groups[i] for i in routed]
    m = _bisect(lambda m: _density([tails[i] for i in routed], [m] * len(routed), ks, min_groups, g), target)
    for i in routed:
      masses[i] = m
  layer_density = [None] * num_layers
  for i in routed:
    layer_density[i] = _density([tails[i]], [masses[i]], [max_groups[i]], min_groups, g)
  realised = float(np.mean([layer_density[i] for i in routed]))
  return AdaptiveBudget(target, tuple(masses), budget_groups, int(min_groups), round(realised, 6),
                        tuple(None if d is None else round(d, 6) for d in layer_density), int(t), bool(per_layer),
                        selector, shards=int(shards))


def realised_density(scores_tlg: np.ndarray, sparsity: SparsityConfig, config) -> float:
  """The average density an adaptive `sparsity` realises on router scores `[T, L, G]` (routed layers)."""
  groups, masses = sparsity.layer_groups(config), sparsity.layer_masses(config)
  if masses is None:
    raise ValueError("realised_density needs an adaptive SparsityConfig")
  scores_tlg, g = np.asarray(scores_tlg), config.num_kv_heads
  shards = sparsity.shards or 1
  if shards > 1:
    scores_tlg, groups = shard_blocks(scores_tlg, groups, shards)
    g = g // shards
  routed = [i for i, k in enumerate(groups) if k is not None]
  tails = [sorted_tail_shares(scores_tlg[:, i]) for i in routed]
  return _density(tails, [masses[i] for i in routed], [groups[i] for i in routed], sparsity.min_groups, g)


def heldout_router_scores(model, routers, sequences: Sequence[Sequence[int]], *, max_tokens: int = 8192,
                          batch_tokens: int = 4096) -> np.ndarray:
  """float32 `[T, L, G]`: the head routers' scores on every layer's normed attention input, for the first
  `max_tokens` valid tokens of `sequences` (the dense model over each sequence, as a decode step sees it)."""
  routers.check_model(model.config)
  w_ldg = np.asarray(routers.head.w_ldg[...], np.float32)
  b_lg = np.asarray(routers.head.b_lg[...], np.float32)
  return _dense_records(model, sequences, max_tokens, batch_tokens,
                        lambda x_tld, norms_tlg: np.einsum("tld,ldg->tlg", x_tld, w_ldg) + b_lg[None])


def heldout_oracle_scores(model, sequences: Sequence[Sequence[int]], *, max_tokens: int = 8192,
                          batch_tokens: int = 4096) -> np.ndarray:
  """float32 `[T, L, G]`: the log of each KV group's attention output norm (the oracle's weights) in every layer,
  for the first `max_tokens` valid tokens of `sequences` (the dense model). Their softmax is each group's share of
  the summed norms, the share the oracle's mass counts (`selection.mass_counts`), so `calibrate_mass` calibrates the
  oracle's mass from them."""
  tiny = np.finfo(np.float32).tiny
  return _dense_records(model, sequences, max_tokens, batch_tokens,
                        lambda x_tld, norms_tlg: np.log(np.maximum(norms_tlg, tiny)))


def _dense_records(model, sequences, max_tokens: int, batch_tokens: int, reduce) -> np.ndarray:
  """`reduce(x_tld, norms_tlg)` over the first `max_tokens` valid tokens of `sequences` (`collect.layer_records`:
  each layer's normed attention input and group output norms), concatenated, as float32."""
  import jax.numpy as jnp
  from flax import nnx

  from polar_jax.routers.collect import _batches, _bucket, _record_program
  graphdef, state = nnx.split(model)
  seqs, n = [], 0
  for s in sequences:
    s = np.asarray(list(s)[:max_tokens - n], np.int32)
    if len(s):
      seqs.append(s)
      n += len(s)
    if n >= max_tokens:
      break
  if not seqs:
    raise ValueError("no tokens to calibrate on")
  out = []
  for group in _batches(seqs, batch_tokens):
    t = _bucket(max(len(s) for s in group))
    tokens = np.zeros((len(group), t), np.int32)
    lengths = np.zeros((len(group),), np.int32)
    for j, s in enumerate(group):
      tokens[j, :len(s)], lengths[j] = s, len(s)
    x_btld, norms_btlg, _ = _record_program(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths),
                                            with_fired=False)
    valid = np.arange(t)[None, :] < lengths[:, None]
    out.append(reduce(np.asarray(x_btld, np.float32)[valid], np.asarray(norms_btlg, np.float32)[valid]))
  return np.concatenate(out).astype(np.float32)


def calibration_sequences(tokenizer, sources: Sequence[str] = ("lambada", "boolq"), *,
                          max_seq_len: int = 512) -> list[list[int]]:
  """Token sequences of the router validation half of the held-out passages (never trained on, and apart from
  the half `polar-eval`'s perplexity scores)."""
  from polar_jax import data
  from polar_jax.routers.pipeline import heldout_part
  seqs = []
  for source in sources:
    for text in data.load_passages(source, split="heldout"):
      if heldout_part(text) == "val":
        ids = tokenizer.encode(text)[:max_seq_len]
        if len(ids) >= 2:
          seqs.append(list(ids))
  return seqs


def calibrate_adaptive(model, tokenizer, routers, target_density: float, *, sparsity: SparsityConfig | None = None,
                       per_layer: bool = False, max_tokens: int = 8192,
                       sources: Sequence[str] = ("lambada", "boolq"), selector: str = "router",
                       scores_tlg: np.ndarray | None = None) -> AdaptiveBudget:
  """`calibrate_mass` on the routers' scores (selector "router") or the log group norms (selector "oracle", the
  upper bound; `routers` may be None) of `max_tokens` held-out tokens (`calibration_sequences`), with the layers'
  most groups from `sparsity` made adaptive (default: every group, layer 0 dense). `scores_tlg`: those scores when
  already computed (several targets on the same tokens)."""
  base = dataclasses.replace(sparsity or SparsityConfig(), budget="adaptive")
  if scores_tlg is None:
    scores_tlg = calibration_scores(model, tokenizer, routers, selector, max_tokens=max_tokens, sources=sources)
  budget = calibrate_mass(scores_tlg, target_density, base.layer_groups(model.config), min_groups=base.min_groups,
                          per_layer=per_layer, selector=selector, shards=base.shards or 1)
  return dataclasses.replace(budget, model=model.config.fingerprint())


def calibration_scores(model, tokenizer, routers, selector: str = "router", *, max_tokens: int = 8192,
                       sources: Sequence[str] = ("lambada", "boolq")) -> np.ndarray:
  """The `[T, L, G]` scores `calibrate_adaptive` calibrates `selector`'s mass on."""
  if selector not in ("router", "oracle"):
    raise ValueError(f"adaptive budgets calibrate the 'router' or 'oracle' selector, got {selector!r}")
  if selector == "router" and routers is None:
    raise ValueError("calibrating the router selector's mass needs routers")
  seqs = calibration_sequences(tokenizer, sources)
  if selector == "router":
    return heldout_router_scores(model, routers, seqs, max_tokens=max_tokens)
  return heldout_oracle_scores(model, seqs, max_tokens=max_tokens)


def save_adaptive_budget(directory: str | os.PathLike, budget: AdaptiveBudget) -> pathlib.Path:
  """Adds `budget` to `directory/adaptive_budget.json` (beside the routers' `metadata.json`), replacing one of
  the same model, target density, per-layer choice, selector and shards."""
  path = pathlib.Path(directory).expanduser() / BUDGET_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  key = lambda b: (b.model, b.target_density, b.per_layer, b.selector, b.shards)
  kept = [b for b in _read_budgets(path) if key(b) != key(budget)]
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps({"budgets": [b.to_json() for b in kept + [budget]]}, indent=1) + "\n")
  tmp.replace(path)
  return path


def _read_budgets(path: pathlib.Path) -> list[AdaptiveBudget]:
  if not path.is_file():
    return []
  return [AdaptiveBudget.from_json(d) for d in json.loads(path.read_text())["budgets"]]


def load_adaptive_budget(directory: str | os.PathLike, target_density: float | None = None,
                         per_layer: bool | None = None, selector: str = "router",
                         model: str | ModelConfig | None = None, shards: int = 1) -> AdaptiveBudget | None:
  """The `AdaptiveBudget` of `selector` stored in `directory` (a router directory) for `target_density` (None: the
  last one stored), `per_layer` (None: either), `model` (a `ModelConfig.fingerprint()`, or the config itself;
  None: any; a budget that recorded no model matches every model) and `shards` (the balanced selection it was
  calibrated for), or None when there is none."""
  if isinstance(model, ModelConfig):
    model = model.fingerprint()
  budgets = [b for b in _read_budgets(pathlib.Path(directory).expanduser() / BUDGET_FILE)
             if (target_density is None or abs(b.target_density - float(target_density)) < 1e-9)
             and (per_layer is None or b.per_layer == per_layer) and b.selector == selector
             and (model is None or b.model in ("", model)) and b.shards == shards]
  return budgets[-1] if budgets else None
