"""Layer-level decode benchmark (the paper's "block simulator") and router cost (a script, not a test).

Layer mode (default): ONE decoder layer of a model shape (random weights, a random B x S KV cache allocated on
the device, never copied: the cache is donated to each timed call) runs `--steps` decode steps inside one
`lax.fori_loop` (each step's output is the next step's input, lengths grow by one), through the library's own
step code: `DecoderLayer.decode` with the layer plan of `sparse_decode.SparseDecode.plans` (the plan
`CausalLM.decode_step` gets), random head routers and, for ReLU MLPs with mlp=router, random neuron routers with
the per-layer neuron budgets of `--mlp-topk-dir` (bsize_B.csv). Measured: the median wall time of a call divided
by `--steps` (ms per layer-step; router cost included), and
  bytes = layer weights read (a sparse MLP reads k of N neuron rows of fc1/fc2) + selected K/V read
  tbps = bytes / ms;  roofline_frac = tbps / copy bandwidth (measured in the same run);
  speedup_vs_dense = ms of the dense layer (density 1, dense MLP) at the same B, S / ms.
Router weights are not in `bytes` (reported as `router_bytes`). Density 1 with a dense MLP is the dense path.

Router cost (`--router-cost`): for a whole model shape and each `--router-batch` B, every layer's routers alone,
as the decode step applies them (head router scores -> per-row top-k in every routed layer; for ReLU MLPs with
mlp=router also the neuron router -> batch union), on random [B, d] inputs per layer, `--steps` times inside one
jitted program: `router_ms` for all layers (method "isolated"). In situ (method "insitu"): one layer at B x
`--router-seq` timed with its routers and with a precomputed fixed selection of the same size; the difference
times the number of routed layers estimates the routers' share of a step. `--step-ms X` prints router_ms / X.

  python benchmarks/layer.py --models llama2-7b --batch 128 --seq 4096 --densities 1 .625 .5 .25
  python benchmarks/layer.py --router-cost --models llama2-7b opt-6.7b --router-batch 16 32 --mlp dense router
  python benchmarks/layer.py --smoke --out /tmp/layer.jsonl      # tiny shapes on CPU: the script end to end
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import pathlib
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks import e2e  # noqa: E402  (sets XLA_PYTHON_CLIENT_MEM_FRACTION before jax starts)
from benchmarks import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from polar_jax.config import ModelConfig  # noqa: E402
from polar_jax.model import DecoderLayer, abstract_model  # noqa: E402
from polar_jax.options import DecodeOptions  # noqa: E402
from polar_jax.routers.modules import default_neuron_rank, has_neuron_mlp  # noqa: E402
from polar_jax.selection import (DENSE_PLAN, GroupIndices, LayerPlan, LinearRouter,  # noqa: E402
                                 NeuronIndices)
from polar_jax.sparse_decode import SparseDecode, make_decoder  # noqa: E402
from polar_jax.sparsity import SparsityConfig, neuron_budgets  # noqa: E402

# A tiny OPT shape (ReLU fc1/fc2 MLP, MHA) so the smoke run covers the neuron router path too.
TINY_OPT = ModelConfig(model_type="opt", vocab_size=128, hidden_size=128, intermediate_size=512, num_layers=4,
                       num_heads=4, num_kv_heads=4, head_dim=32, max_position_embeddings=512, norm="layer",
                       norm_eps=1e-5, mlp="relu_mlp", activation="relu", attn_bias=True, o_bias=True,
                       mlp_bias=True, positions="learned", tie_word_embeddings=True)
SHAPES: dict[str, ModelConfig] = {**e2e.MODELS, "tiny-opt": TINY_OPT}
DEFAULT_TOPK_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared/reference-data/mlp_topk/opt-6.7b"
RESULTS = common.RESULTS_DIR / "layer.jsonl"
INSITU_ITERS_FACTOR = 3   # the in-situ difference is small: time both programs 3x --iters rounds


# ---- the one-layer model ---------------------------------------------------------------------------------------
class OneLayer(nnx.Module):
  """One `DecoderLayer` under the names the decode step's hooks read (`config`, `layers`, `dtype`).

  `config` is the model's config with num_layers = 1, so routers, budgets and `make_decoder` line up with it."""

  def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
    self.config = dataclasses.replace(config, num_layers=1)
    self.dtype = jnp.dtype(dtype)
    self.layers = nnx.List([DecoderLayer(self.config, dtype=dtype, rngs=rngs)])


def random_one_layer(config: ModelConfig, dtype, seed: int = 0) -> OneLayer:
  """A `OneLayer` with random weights, filled leaf by leaf on the device (`e2e.randomize`)."""
  return e2e.randomize(nnx.eval_shape(lambda: OneLayer(config, dtype=dtype, rngs=nnx.Rngs(0))), seed)


@functools.partial(jax.jit, static_argnums=(1, 2))
def random_cache(key, shape_bhsd: tuple[int, ...], dtype) -> jax.Array:
  """A random `[B, Hkv, S, D]` cache made on the device one batch row at a time (no full-size temporaries)."""
  def row(b, cache):
    return cache.at[b].set(jax.random.normal(jax.random.fold_in(key, b), shape_bhsd[1:], dtype))
  return jax.lax.fori_loop(0, shape_bhsd[0], row, jnp.zeros(shape_bhsd, dtype))


def initial_lengths(batch: int, seq: int, steps: int, ragged: bool, seed: int = 0) -> np.ndarray:
  """int32 `[B]` cache lengths before the first timed step: S - steps (the last step fills slot S - 1), or with
  `ragged` uniform per row in [S / 2, S - steps]."""
  top = seq - steps
  if top < 1:
    raise ValueError(f"seq {seq} must exceed steps {steps}")
  if not ragged:
    return np.full((batch,), top, np.int32)
  return np.random.default_rng(seed).integers(min(seq // 2, top), top + 1, batch).astype(np.int32)


def mean_read_length(lengths0_b: np.ndarray, steps: int) -> float:
  """Mean tokens a step's attention reads per row: step i (0-based) reads lengths0 + i + 1."""
  return float(np.mean(lengths0_b)) + (steps + 1) / 2


# ---- bytes ---------------------------------------------------------------------------------------------------
NEURON_ROW_PARAMS = ("mlp.w_in_nd", "mlp.b_in_n", "mlp.w_out_nd")   # one row (or entry) per neuron


def layer_weight_bytes(layer: DecoderLayer, neuron_k: int | None = None) -> int:
  """Bytes of one layer's parameters a decode step reads; with a neuron budget k the ReLU MLP reads k of its
  N rows of fc1 (and fc1 bias) and fc2, and all the rest."""
  total = 0
  for path, leaf in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
    arr = leaf.get_value() if hasattr(leaf, "get_value") else leaf
    nbytes = math.prod(arr.shape) * jnp.dtype(arr.dtype).itemsize
    if neuron_k is not None and ".".join(map(str, path)) in NEURON_ROW_PARAMS:
      nbytes = nbytes // arr.shape[0] * neuron_k
    total += nbytes
  return total


def selected_kv_bytes(config: ModelConfig, batch: int, mean_len: float, groups: int, itemsize: int) -> float:
  """K+V bytes one layer's attention reads per step with `groups` of the KV groups kept per row
  (`e2e.kv_bytes_per_step` for one layer; a sliding window caps the length)."""
  one = dataclasses.replace(config, num_layers=1)
  return e2e.kv_bytes_per_step(one, batch, mean_len, itemsize, lambda _: groups / config.num_kv_heads)


def router_bytes(config: ModelConfig, head: bool, neuron: bool, neuron_itemsize: int = 4) -> int:
  """Router weight bytes one layer's routers read: head (float32) d x G + G; neuron d x r + r x N weights of
  `neuron_itemsize` bytes (the decode step's copy is in the model's dtype: 2 for bf16) + N float32 biases."""
  d, g, n = config.hidden_size, config.num_kv_heads, config.intermediate_size
  r = default_neuron_rank(d)
  return 4 * (d * g + g if head else 0) + ((d * r + r * n) * neuron_itemsize + 4 * n if neuron else 0)


# ---- settings and selection ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerSetting:
  """One measured configuration of a layer."""

  model: str
  batch: int
  seq: int
  density: float = 1.0
  mlp: str = "dense"
  mlp_layer: int | None = None   # the layer of the budget table whose neuron budget is used (mlp="router")


def layer_topk(table: dict[int, tuple[int, ...]], layer: int) -> dict[int, tuple[int, ...]]:
  """The budget table of one layer (`{B: (k,)}`), for the one-layer model."""
  return {b: (ks[layer],) for b, ks in table.items()}


def median_budget_layer(table: dict[int, tuple[int, ...]], batch: int, num_neurons: int) -> int:
  """The layer whose neuron budget at `batch` is the (lower) median among layers that run sparse (0 if none)."""
  budgets = neuron_budgets(table, batch, num_neurons)
  sparse = sorted((k, i) for i, k in enumerate(budgets) if k is not None)
  return sparse[(len(sparse) - 1) // 2][1] if sparse else 0


def layer_decoder(layer_model: OneLayer, setting: LayerSetting, table, options=None):
  """`(decode, router_state)` for the one-layer model: what `make_decoder` builds for the model's step (the layer
  is routed: no dense first layer), with random routers (`e2e.random_routers`)."""
  config = layer_model.config
  sparse = setting.density < 1.0 or setting.mlp == "router"
  if not sparse:
    return make_decoder(layer_model, None, options=options)
  topk = layer_topk(table, setting.mlp_layer or 0) if setting.mlp == "router" else None
  routers = e2e.random_routers(config, mlp_topk=topk)
  sparsity = SparsityConfig(attn_density=setting.density, mlp=setting.mlp, dense_layers=())
  return make_decoder(layer_model, sparsity, routers, batch=setting.batch, options=options)


def kept_groups(config: ModelConfig, decode) -> int:
  """KV groups layer 0 of `decode` reads per row."""
  k = decode.groups[0] if isinstance(decode, SparseDecode) else None
  return config.num_kv_heads if k is None else k


def neuron_k_of(decode) -> int | None:
  """Layer 0's neuron budget in `decode`, None for a dense MLP (also when the budget exceeds `mlp_dense_above` x N)."""
  return decode.neuron_k[0] if isinstance(decode, SparseDecode) and decode.neuron_k is not None else None


def fixed_selection(config: ModelConfig, decode, batch: int, seed: int = 1) -> dict[str, Any]:
  """A precomputed random selection of the decoder's sizes: `groups` `[B, k]` per row, `neurons` `[k]`."""
  kg, kn = jax.random.split(jax.random.key(seed))
  k, nk = kept_groups(config, decode), neuron_k_of(decode)
  groups = None
  if k < config.num_kv_heads:
    groups = jnp.argsort(jax.random.uniform(kg, (batch, config.num_kv_heads)), axis=1)[:, :k].astype(jnp.int32)
  neurons = None if nk is None else jnp.argsort(jax.random.uniform(kn, (config.intermediate_size,)))[:nk]
  return {"groups": groups, "neurons": None if neurons is None else neurons.astype(jnp.int32)}


def layer_plan(model: OneLayer, decode, lengths_b, router_state, active_b, fixed) -> LayerPlan:
  """The `LayerPlan` that `CausalLM.decode_step` hands layer 0: the step's own, or (`fixed`) the same computation
  with a precomputed selection in place of the routers."""
  if not isinstance(decode, SparseDecode):
    return DENSE_PLAN
  if fixed is not None:
    groups, neurons = fixed["groups"], fixed["neurons"]
    return LayerPlan(DENSE_PLAN.heads if groups is None else GroupIndices(groups),
                     None if neurons is None else NeuronIndices(neurons))
  return decode.plans(model, jnp.zeros_like(lengths_b), lengths_b, router_state, active_b)[0]


def _layer_steps(k_bhsd, v_bhsd, h_bd, state, lengths0_b, router_state, fixed, *, graphdef, decode, steps):
  """`steps` decode steps of the layer; returns the caches (donated in, updated in place) and the last output."""
  model = nnx.merge(graphdef, state)
  layer = model.layers[0]
  active_b = jnp.ones(h_bd.shape[:1], bool)

  def body(_, carry):
    h, k, v, lengths = carry
    plan = layer_plan(model, decode, lengths, router_state, active_b, fixed)
    out = layer.decode(h, lengths, k, v, plan, options=decode.options)
    return out.h.astype(h.dtype), out.k_cache_bhsd, out.v_cache_bhsd, lengths + 1

  h, k, v, _ = jax.lax.fori_loop(0, steps, body, (h_bd, k_bhsd, v_bhsd, lengths0_b))
  return k, v, h


# ---- timing ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Timing:
  """How a program is timed: `steps` steps per call inside one fori_loop, median of `iters` calls."""

  steps: int = 16
  iters: int = 5
  warmup: int = 2


@dataclasses.dataclass
class LayerBench:
  """A one-layer model with its cache and current input on the device (mutable: every timed call donates the
  cache and stores the updated one, so settings share one cache and nothing is copied)."""

  config: ModelConfig
  model: OneLayer
  k_bhsd: jax.Array
  v_bhsd: jax.Array
  h_bd: jax.Array
  lengths0_b: np.ndarray
  options: DecodeOptions = DecodeOptions()

  @classmethod
  def create(cls, config: ModelConfig, batch: int, seq: int, dtype, timing: Timing, ragged=False,
             options: DecodeOptions = DecodeOptions(), fuse=True) -> "LayerBench":
    model = random_one_layer(config, dtype)
    if fuse:   # one q|k|v and one gate|up matmul, as the end-to-end step (polar_jax.fusion)
      from polar_jax.fusion import fuse_projections
      fuse_projections(model)
    shape = (batch, config.num_kv_heads, seq, config.head_dim)
    k = random_cache(jax.random.key(1), shape, jnp.dtype(dtype))
    v = random_cache(jax.random.key(2), shape, jnp.dtype(dtype))
    h = jax.random.normal(jax.random.key(3), (batch, config.hidden_size), jnp.float32).astype(dtype)
    return cls(config, model, k, v, h, initial_lengths(batch, seq, timing.steps, ragged), options)

  @property
  def batch(self) -> int:
    return self.k_bhsd.shape[0]

  def program(self, decode, router_state, timing: Timing, fixed=None):
    """A zero-argument call that runs `timing.steps` layer-steps of `decode` (its routers, or the `fixed`
    selection) from the initial lengths and returns the last output."""
    graphdef, state = nnx.split(self.model)
    run = jax.jit(functools.partial(_layer_steps, graphdef=graphdef, decode=decode, steps=timing.steps),
                  donate_argnums=(0, 1))
    lengths = jnp.asarray(self.lengths0_b)

    def call():
      self.k_bhsd, self.v_bhsd, self.h_bd = run(self.k_bhsd, self.v_bhsd, self.h_bd, state, lengths, router_state,
                                                fixed)
      return self.h_bd

    return call

  def time_ms(self, decode, router_state, timing: Timing, fixed=None) -> float:
    """Median ms per layer-step (wall clock of a call / steps)."""
    call = self.program(decode, router_state, timing, fixed)
    return common.time_fn(call, warmup=timing.warmup, iters=timing.iters) * 1e3 / timing.steps


def interleaved_ms(calls, timing: Timing) -> list[float]:
  """Median ms per step of each call, timed in alternation (every round runs each call once), so that drift of
  the device (clocks, neighbours) affects all alike; for differences of nearly equal times."""
  for call in calls:
    for _ in range(timing.warmup):
      jax.block_until_ready(call())
  times = [[] for _ in calls]
  for _ in range(timing.iters):
    for i, call in enumerate(calls):
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      times[i].append(time.perf_counter() - t0)
  return [statistics.median(t) * 1e3 / timing.steps for t in times]


def layer_bytes(bench: LayerBench, decode, steps: int) -> dict[str, float]:
  """`bytes` (weights + KV), `kv_bytes`, `weight_bytes`, `router_bytes` of one layer-step of `decode`."""
  config, layer = bench.config, bench.model.layers[0]
  itemsize = jnp.dtype(bench.model.dtype).itemsize
  kv = selected_kv_bytes(config, bench.batch, mean_read_length(bench.lengths0_b, steps), kept_groups(config, decode),
                         itemsize)
  weights = layer_weight_bytes(layer, neuron_k_of(decode))
  routed = isinstance(decode, SparseDecode)
  rb = router_bytes(config, routed and decode.head_router, neuron_k_of(decode) is not None, itemsize)
  return dict(bytes=weights + kv, kv_bytes=kv, weight_bytes=weights, router_bytes=rb)


# ---- layer mode ----------------------------------------------------------------------------------------------
def layer_settings(name: str, config: ModelConfig, batch: int, seq: int, densities, mlps, mlp_layers, table):
  """Dense first (the speed-up reference), then every (density, mlp) pair that applies to the model."""
  out = [LayerSetting(name, batch, seq)]
  for density in densities:
    for mlp in mlps:
      if mlp == "router" and not has_neuron_mlp(config):
        continue
      layers = [None] if mlp == "dense" else (
          mlp_layers or [median_budget_layer(table, batch, config.intermediate_size)])
      for layer in layers:
        s = LayerSetting(name, batch, seq, density, mlp, layer)
        if s != out[0] and not (density >= 1.0 and mlp == "dense"):
          out.append(s)
  return out


def measure_layer(bench: LayerBench, setting: LayerSetting, table, timing: Timing, copy_tbps: float) -> dict:
  """One layer record (without provenance)."""
  decode, router_state = layer_decoder(bench.model, setting, table, bench.options)
  ms = bench.time_ms(decode, router_state, timing)
  nbytes = layer_bytes(bench, decode, timing.steps)
  tbps = nbytes["bytes"] / (ms * 1e-3) / 1e12
  return dict(kind="layer", model=setting.model, B=setting.batch, S=setting.seq, density=setting.density,
              mlp=setting.mlp, mlp_layer=setting.mlp_layer, mlp_k=neuron_k_of(decode),
              groups=kept_groups(bench.config, decode), steps=timing.steps,
              mean_len=mean_read_length(bench.lengths0_b, timing.steps), ms=ms, tbps=tbps, copy_tbps=copy_tbps,
              roofline_frac=tbps / copy_tbps, **nbytes)


def run_layers(args, name: str, config: ModelConfig, timing: Timing, copy_tbps: float, sink) -> list[dict]:
  table = mlp_table(args, config)
  records = []
  for batch in args.batch:
    for seq in args.seq:
      bench = LayerBench.create(config, batch, seq, jnp.dtype(args.dtype), timing, args.ragged,
                                DecodeOptions(kernels=args.kernels),
                                not args.no_fuse)
      dense_ms = None
      for s in layer_settings(name, config, batch, seq, args.densities, args.mlp, args.mlp_layers, table):
        rec = measure_layer(bench, s, table, timing, copy_tbps)
        dense_ms = rec["ms"] if dense_ms is None else dense_ms
        rec["speedup_vs_dense"] = dense_ms / rec["ms"]
        records.append(sink(rec))
      del bench
  return records


# ---- router cost ---------------------------------------------------------------------------------------------
def model_decoder(config: ModelConfig, batch: int, density: float, mlp: str, table, dtype):
  """`(decode, router_state)` of the whole model's step (`e2e.sparsity_for`: layer 0 dense), random routers."""
  abstract = abstract_model(config, dtype=dtype)
  sparsity = SparsityConfig(attn_density=density, mlp=mlp)
  routers = e2e.random_routers(config, mlp_topk=table if mlp == "router" else None)
  decode, state = make_decoder(abstract, sparsity, routers, batch=batch)
  return abstract, decode, state


def routed_layers(decode) -> tuple[int, int]:
  """(layers with a head router, layers with a neuron router) in a step of `decode`."""
  if not isinstance(decode, SparseDecode):
    return 0, 0
  heads = sum(k is not None for k in decode.groups) if decode.head_router else 0
  neurons = 0 if decode.neuron_k is None else sum(k is not None for k in decode.neuron_k)
  return heads, neurons


def _router_steps(router_state, x_lbd, *, model, decode, steps):
  """`steps` applications of every layer's routers (each step's inputs depend on the last step's picks)."""
  batch = x_lbd.shape[1]
  zeros_b = jnp.zeros((batch,), jnp.int32)
  plans = decode.plans(model, zeros_b, zeros_b, router_state, jnp.ones((batch,), bool))

  def body(_, s):
    acc = jnp.zeros((), jnp.float32)
    for layer, plan in enumerate(plans):
      x = x_lbd[layer] + s.astype(x_lbd.dtype)
      if isinstance(plan.heads, LinearRouter):
        acc = acc + plan.heads.select(x).sum().astype(jnp.float32)
      elif isinstance(plan.heads, GroupIndices):
        acc = acc + plan.heads.idx_bk.sum().astype(jnp.float32)
      if plan.neurons is not None:
        acc = acc + plan.neurons.indices(x, decode.options).sum().astype(jnp.float32)
    return s + 1e-30 * acc

  return jax.lax.fori_loop(0, steps, body, jnp.zeros((), jnp.float32))


def isolated_router_ms(config: ModelConfig, batch: int, density: float, mlp: str, table, dtype,
                       timing: Timing) -> dict:
  """Whole-model routers alone at batch B, one jitted program: a "router_cost" record (method "isolated")."""
  model, decode, state = model_decoder(config, batch, density, mlp, table, dtype)
  heads, neurons = routed_layers(decode)
  x_lbd = jax.random.normal(jax.random.key(4), (config.num_layers, batch, config.hidden_size), dtype)
  run = jax.jit(functools.partial(_router_steps, model=model, decode=decode, steps=timing.steps))
  seconds = common.time_fn(lambda: run(state, x_lbd), warmup=timing.warmup, iters=timing.iters)
  return dict(kind="router_cost", method="isolated", B=batch, density=density, mlp=mlp, head_layers=heads,
              neuron_layers=neurons, router_ms=seconds * 1e3 / timing.steps, steps=timing.steps,
              router_bytes=heads * router_bytes(config, True, False)
              + neurons * router_bytes(config, False, True, jnp.dtype(dtype).itemsize))


def insitu_router_ms(bench: LayerBench, setting: LayerSetting, table, timing: Timing) -> dict:
  """One layer's step with its routers vs with a fixed selection of the same size (same B, S)."""
  decode, state = layer_decoder(bench.model, setting, table, bench.options)
  calls = [bench.program(decode, state, timing), bench.program(decode, state, timing,
                                                                fixed_selection(bench.config, decode, bench.batch))]
  routed, fixed = interleaved_ms(calls, dataclasses.replace(timing, iters=INSITU_ITERS_FACTOR * timing.iters))
  return dict(kind="router_cost", method="insitu", B=setting.batch, S=setting.seq, density=setting.density,
              mlp=setting.mlp, mlp_layer=setting.mlp_layer, mlp_k=neuron_k_of(decode), ms_routed=routed,
              ms_fixed=fixed, layer_router_ms=routed - fixed, steps=timing.steps)


def insitu_estimate(layer_ms: dict[str, float], heads: int, neurons: int) -> dict[str, float]:
  """Whole-model router ms from one layer's in-situ differences: `layer_ms["dense"]` (head router only) x head
  layers, plus (`layer_ms["router"]` - head-only) x neuron layers when the MLP is routed."""
  head = layer_ms["dense"] * heads
  out = {"dense": head}
  if "router" in layer_ms:
    out["router"] = head + (layer_ms["router"] - layer_ms["dense"]) * neurons
  return out


def run_router_cost(args, name: str, config: ModelConfig, timing: Timing, sink) -> list[dict]:
  table = mlp_table(args, config)
  dtype = jnp.dtype(args.dtype)
  # head routers always; the in-situ estimate needs the head-only run to separate the neuron router's share
  mlps = ["dense"] + (["router"] if "router" in args.mlp and has_neuron_mlp(config) else [])
  records = []
  for batch in args.router_batch:
    bench = LayerBench.create(config, batch, args.router_seq, dtype, timing, args.ragged,
                              DecodeOptions(kernels=args.kernels),
                              not args.no_fuse)
    layer_ms, counts = {}, {}
    for mlp in mlps:
      iso = isolated_router_ms(config, batch, args.router_density, mlp, table, dtype, timing)
      counts[mlp] = (iso["head_layers"], iso["neuron_layers"])
      records.append(sink(dict(iso, model=name, **step_ratio(iso["router_ms"], args.step_ms))))
      layer = median_budget_layer(table, batch, config.intermediate_size) if mlp == "router" else None
      setting = LayerSetting(name, batch, args.router_seq, args.router_density, mlp, layer)
      rec = insitu_router_ms(bench, setting, table, timing)
      layer_ms[mlp] = rec["layer_router_ms"]
      rec.update(model=name, head_layers=counts[mlp][0], neuron_layers=counts[mlp][1])
      rec["router_ms"] = insitu_estimate(layer_ms, *counts[mlp])[mlp]
      records.append(sink(dict(rec, **step_ratio(rec["router_ms"], args.step_ms))))
    del bench
  return records


def step_ratio(router_ms: float, step_ms: float | None) -> dict[str, float]:
  return {} if step_ms is None else dict(step_ms=step_ms, router_frac_of_step=router_ms / step_ms)


# ---- CLI -----------------------------------------------------------------------------------------------------
def mlp_table(args, config: ModelConfig) -> dict[int, tuple[int, ...]] | None:
  """Neuron budgets for mlp=router: `--mlp-topk-dir` (e2e.read_mlp_topk), or N / 4 everywhere in smoke mode."""
  if "router" not in args.mlp or not has_neuron_mlp(config):
    return None
  if args.smoke:
    return {b: (config.intermediate_size // 4,) * config.num_layers for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)}
  table = e2e.read_mlp_topk(args.mlp_topk_dir)
  if not table or len(next(iter(table.values()))) != config.num_layers:
    raise ValueError(f"{args.mlp_topk_dir}: no bsize_B.csv budgets for {config.num_layers} layers")
  return table


def print_row(rec: dict) -> None:
  if rec["kind"] == "layer":
    mlp = f"router k={rec['mlp_k']}" if rec["mlp_k"] else ("router (dense)" if rec["mlp"] == "router" else "dense")
    print(f"{rec['model']:12s} B{rec['B']:<4d} S{rec['S']:<6d} density {rec['density']:<6.3f} mlp {mlp:16s}"
          f"{rec['ms']:8.3f} ms {rec['bytes'] / 1e9:7.3f} GB {rec['tbps']:5.2f} TB/s roofline "
          f"{rec['roofline_frac']:.2f} speed-up {rec['speedup_vs_dense']:.2f}", flush=True)
    return
  extra = (f" (layer: routed {rec['ms_routed']:.4f} ms, fixed {rec['ms_fixed']:.4f} ms)"
           if rec["method"] == "insitu" else "")
  frac = f" = {100 * rec['router_frac_of_step']:.2f}% of a {rec['step_ms']} ms step" if "step_ms" in rec else ""
  print(f"{rec['model']:12s} B{rec['B']:<4d} routers {rec['method']:8s} mlp {rec['mlp']:6s} "
        f"{rec['head_layers']} head + {rec['neuron_layers']} neuron layers: {rec['router_ms']:.4f} ms{frac}{extra}",
        flush=True)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", default=["llama2-7b"], choices=sorted(SHAPES))
  p.add_argument("--batch", nargs="+", type=int, default=[128])
  p.add_argument("--seq", nargs="+", type=int, default=[4096], help="KV cache slots per row (S)")
  p.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.625, 0.5, 0.25])
  p.add_argument("--mlp", nargs="+", default=["dense"], choices=["dense", "router"],
                 help="MLP modes (router: batch-union neurons, ReLU models only)")
  p.add_argument("--mlp-layers", nargs="+", type=int, default=None,
                 help="layers of the budget table whose neuron budget a layer run uses (default: the median budget)")
  p.add_argument("--mlp-topk-dir", type=pathlib.Path, default=DEFAULT_TOPK_DIR)
  p.add_argument("--ragged", action="store_true", help="per-row cache lengths uniform in [S/2, S - steps]")
  p.add_argument("--steps", type=int, default=16, help="decode steps per timed call (one fori_loop)")
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--kernels", default="auto", choices=["auto", "pallas", "xla"],
                 help="DecodeOptions.kernels (default: auto, the platform's)")
  p.add_argument("--no-layers", action="store_true", help="skip the layer benchmark")
  p.add_argument("--no-fuse", action="store_true", help="separate q/k/v and gate/up projections (default: fused)")
  p.add_argument("--router-cost", action="store_true", help="time the routers of the whole model")
  p.add_argument("--router-batch", nargs="+", type=int, default=[16, 32])
  p.add_argument("--router-seq", type=int, default=2048, help="cache slots of the in-situ layer")
  p.add_argument("--router-density", type=float, default=0.5)
  p.add_argument("--step-ms", type=float, default=None, help="an end-to-end ms per step: print router_ms / it")
  p.add_argument("--out", type=pathlib.Path, default=RESULTS)
  p.add_argument("--smoke", action="store_true", help="tiny shapes, float32, CPU friendly")
  args = p.parse_args(argv)
  if not 0.0 < args.router_density < 1.0:
    p.error("--router-density must be in (0, 1): at 1 no head router runs")
  if args.smoke:
    args.models, args.batch, args.seq, args.dtype = ["tiny", "tiny-opt"], [2], [32], "float32"
    args.densities, args.mlp, args.steps, args.iters = [1.0, 0.5], ["dense", "router"], 2, 2
    args.router_cost, args.router_batch, args.router_seq = True, [2], 32
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  timing = Timing(args.steps, args.iters, warmup=1 if args.smoke else 2)
  copy_tbps = common.copy_bandwidth_tbps(1 << 24 if args.smoke else 1 << 31)
  prov = common.provenance()
  print(f"{prov['device']} jax {prov['jax']}: copy bandwidth {copy_tbps:.2f} TB/s", flush=True)

  def sink(rec):
    rec = dict(prov, dtype=args.dtype, ragged=args.ragged, fused=not args.no_fuse, **rec)
    common.append_jsonl(args.out, [rec])     # written as measured: a cut-off run keeps its rows
    print_row(rec)
    return rec

  records = []
  for name in args.models:
    config = SHAPES[name]
    if not args.no_layers:
      records += run_layers(args, name, config, timing, copy_tbps, sink)
    if args.router_cost:
      records += run_router_cost(args, name, config, timing, sink)
  print(f"wrote {len(records)} records to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
