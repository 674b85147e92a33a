"""Router modules (Flax NNX), stacked over layers so that all layers train together under `vmap`.

Both routers of layer i read that layer's pre-attention normed hidden state `x_bd` (the input of its
q/k/v projections), in float32.

  * `HeadRouters`: one linear map per layer, d -> num KV groups (with bias): a score per KV group
    (= per head for MHA). Group-level end to end: labels, training, checkpoints and inference use KV groups.
  * `NeuronRouters` (ReLU MLPs, OPT): a low-rank map per layer, d -> r -> N (bias on the output), whose
    logits predict which fc1 neurons fire.
  * `Routers`: the routers of one model plus its identity (config fingerprint), the neuron budget table and
    the training metadata.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from polar_jax.config import ModelConfig

MAX_NEURON_RANK = 1024


def default_neuron_rank(hidden_size: int) -> int:
  """r = min(1024, max(16, d // 4)): 1024 for OPT-6.7B (d = 4096, as the paper); ~16% of the MLP's cost."""
  return min(MAX_NEURON_RANK, max(16, hidden_size // 4))


def has_neuron_mlp(config: ModelConfig) -> bool:
  """True for ReLU fc1/fc2 MLPs (OPT), the only ones with activation sparsity to route."""
  return config.mlp == "relu_mlp" and config.activation == "relu"


class HeadRouters(nnx.Module):
  """Per-layer KV-group routers: `scores_bg = x_bd @ w_ldg[layer] + b_lg[layer]`.

  Attributes:
    w_ldg: `[L, d, G]` float32 weights.
    b_lg: `[L, G]` float32 biases.
  """

  def __init__(self, num_layers: int, hidden_size: int, num_groups: int, *, rngs: nnx.Rngs | None = None):
    del rngs  # a linear classifier trained from zero (the problem is convex)
    self.w_ldg = nnx.Param(jnp.zeros((num_layers, hidden_size, num_groups), jnp.float32))
    self.b_lg = nnx.Param(jnp.zeros((num_layers, num_groups), jnp.float32))

  @property
  def num_layers(self) -> int:
    return self.w_ldg.shape[0]

  @property
  def num_groups(self) -> int:
    return self.w_ldg.shape[2]

  def layer_scores(self, layer: int, x_bd: jax.Array) -> jax.Array:
    """float32 `[B, G]` scores of one layer."""
    return head_scores(self.w_ldg[layer], self.b_lg[layer], x_bd)

  def __call__(self, x_lbd: jax.Array) -> jax.Array:
    """float32 `[L, B, G]` scores of every layer (`x_lbd`: each layer's router input)."""
    return jax.vmap(head_scores)(self.w_ldg[...], self.b_lg[...], x_lbd)


def head_scores(w_dg, b_g, x_bd):
  """One layer's head-router scores `[B, G]` (float32)."""
  return jnp.dot(x_bd.astype(jnp.float32), w_dg, preferred_element_type=jnp.float32) + b_g


class NeuronRouters(nnx.Module):
  """Per-layer low-rank neuron routers: `logits_bn = (x_bd @ w_down_ldr[l]) @ w_up_lrn[l] + b_ln[l]`.

  Attributes:
    w_down_ldr: `[L, d, r]`, w_up_lrn: `[L, r, N]`, b_ln: `[L, N]`, all float32.
  """

  def __init__(self, num_layers: int, hidden_size: int, num_neurons: int, rank: int, *, rngs: nnx.Rngs):
    k1, k2 = jax.random.split(rngs.params())
    self.w_down_ldr = nnx.Param(jax.random.normal(k1, (num_layers, hidden_size, rank)) / hidden_size ** 0.5)
    self.w_up_lrn = nnx.Param(jax.random.normal(k2, (num_layers, rank, num_neurons)) * 0.1 / rank ** 0.5)
    self.b_ln = nnx.Param(jnp.zeros((num_layers, num_neurons), jnp.float32))

  @property
  def num_neurons(self) -> int:
    return self.w_up_lrn.shape[2]

  def layer_logits(self, layer: int, x_bd: jax.Array) -> jax.Array:
    """float32 `[B, N]` logits of one layer (> 0: predicted to fire)."""
    return neuron_logits(self.w_down_ldr[layer], self.w_up_lrn[layer], self.b_ln[layer], x_bd)

  def __call__(self, x_lbd: jax.Array) -> jax.Array:
    """float32 `[L, B, N]` logits of every layer."""
    return jax.vmap(neuron_logits)(self.w_down_ldr[...], self.w_up_lrn[...], self.b_ln[...], x_lbd)


def neuron_logits(w_down_dr, w_up_rn, b_n, x_bd):
  """One layer's neuron-router logits `[B, N]` (float32), computed in the weights' dtype with float32
  accumulation: float32 weights (training, calibration, checkpoints) give exactly the float32 logits; bf16
  weights (the decode copy, `decode_neuron_layers`) read half the bytes, with `x_bd` and the rank-r
  intermediate rounded to bf16 like the input of any bf16 layer."""
  low_br = neuron_low_rank(w_down_dr, x_bd).astype(w_up_rn.dtype)
  return jnp.dot(low_br, w_up_rn, preferred_element_type=jnp.float32) + b_n.astype(jnp.float32)


def neuron_low_rank(w_down_dr, x_bd):
  """`[B, r]`: the neuron router's rank-r down-projection in the weight's dtype (float32 accumulation, then
  rounded), the first half of `neuron_logits` and of `decode_neuron_union`."""
  return jnp.dot(x_bd.astype(w_down_dr.dtype), w_down_dr, preferred_element_type=jnp.float32).astype(
      w_down_dr.dtype)


def decode_head_layers(head: HeadRouters, layers, dtype=jnp.float32) -> tuple:
  """The head routers as the decode step reads them: per layer `(w_dg, b_g)` with the weight cast to `dtype`
  (the bias stays float32), or None where `layers[i]` is false (a dense layer: no router). One array per layer,
  made once outside the decode loop, so the step neither slices the stacked `[L, d, G]` parameter nor casts it."""
  dtype = jnp.dtype(dtype)
  w, b = head.w_ldg[...], head.b_lg[...]
  return tuple((w[i].astype(dtype), b[i].astype(jnp.float32)) if use else None for i, use in enumerate(layers))


def decode_head_scores(w_dg, b_g, x_bd):
  """`head_scores` for the decode step from `decode_head_layers`' copy: float32 `[B, G]`, computed in the
  weight's dtype with float32 accumulation, as the layer's own projections.

  float32 weights give exactly `head_scores` (IEEE float32 products: a GPU dot would otherwise use TF32). A
  copy in the model's dtype (bf16) runs as one small GEMM on the normed input the q/k/v projection already
  reads, where the float32 product-and-reduce form made XLA fuse a second copy of the norm into the router
  kernel (4.7 vs 1.9 + 1.5 us per layer at LLaMA-2-7B B32; on an H100; XLA does not merge
  it into the q/k/v GEMM: outputs 32 vs 12288 columns wide). The scores then carry bf16 rounding of x and w,
  like any bf16 layer's input."""
  precision = jax.lax.Precision.HIGHEST if w_dg.dtype == jnp.float32 else None
  return jnp.dot(x_bd.astype(w_dg.dtype), w_dg, preferred_element_type=jnp.float32,
                 precision=precision) + b_g.astype(jnp.float32)


class DecodeNeuronRouter(NamedTuple):
  """One layer's neuron router as the decode step reads it (`decode_neuron_layers`).

  Attributes:
    w_down_dr, w_up_rn: the weights in the decode dtype, or int8 with a float32 scale per output column
      (`s_down_r`, `s_up_n`; None otherwise): `w ~= q * s`.
    b_n: float32 bias.
  """

  w_down_dr: jax.Array
  w_up_rn: jax.Array
  b_n: jax.Array
  s_down_r: jax.Array | None = None
  s_up_n: jax.Array | None = None


def quantize_int8_columns(w_kn: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric per-column int8: `(q_kn, s_n)` with `s = max|w[:, n]| / 127` and `q = round(w / s)` in
  [-127, 127], so every weight is within `s / 2` of `q * s` (an all-zero column gets s = 0, q = 0)."""
  w = jnp.asarray(w_kn, jnp.float32)
  s_n = jnp.max(jnp.abs(w), axis=0) / 127.0
  q = jnp.where(s_n > 0, jnp.round(w / jnp.where(s_n > 0, s_n, 1.0)), 0.0)
  return jnp.clip(q, -127, 127).astype(jnp.int8), s_n


def decode_neuron_layers(neuron: NeuronRouters, layers, dtype) -> tuple:
  """The neuron routers as the decode step reads them: per layer a `DecodeNeuronRouter` with the weights cast
  to `dtype` (the bias stays float32), or None where `layers[i]` is false (a dense MLP: no router).
  `dtype=int8`: each weight quantized per output column (`quantize_int8_columns`), half the bytes of bf16; the
  products then run in the dtype of the normed input (the model's) on the weights converted in the GEMM, the
  column scales applied to the float32 sums (`decode_neuron_logits`).

  One array per layer, cast once here (outside the decode loop): the step neither slices the stacked `[L, ...]`
  float32 parameters nor re-reads them to cast."""
  dtype = jnp.dtype(dtype)
  w_down, w_up, b = neuron.w_down_ldr[...], neuron.w_up_lrn[...], neuron.b_ln[...]
  out = []
  for i, use in enumerate(layers):
    if not use:
      out.append(None)
    elif dtype == jnp.int8:
      (qd, sd), (qu, su) = quantize_int8_columns(w_down[i]), quantize_int8_columns(w_up[i])
      out.append(DecodeNeuronRouter(qd, qu, b[i].astype(jnp.float32), sd, su))
    else:
      out.append(DecodeNeuronRouter(w_down[i].astype(dtype), w_up[i].astype(dtype), b[i].astype(jnp.float32)))
  return tuple(out)


def decode_neuron_logits(router: DecodeNeuronRouter, x_bd: jax.Array) -> jax.Array:
  """float32 `[B, N]` logits from one layer's `decode_neuron_layers` copy: `neuron_logits` for float weights;
  for int8 weights `((x @ q_down) * s_down) @ q_up * s_up + b`, the products in x's dtype (int8 values are exact
  in bf16) with float32 sums, the rank-r intermediate rounded to x's dtype."""
  if router.s_down_r is None:
    return neuron_logits(router.w_down_dr, router.w_up_rn, router.b_n, x_bd)
  cd = x_bd.dtype
  precision = jax.lax.Precision.HIGHEST if cd == jnp.float32 else None     # not TF32 for float32 inputs
  low_br = jnp.dot(x_bd, router.w_down_dr.astype(cd), preferred_element_type=jnp.float32,
                   precision=precision) * router.s_down_r
  up_bn = jnp.dot(low_br.astype(cd), router.w_up_rn.astype(cd), preferred_element_type=jnp.float32,
                  precision=precision)
  return up_bn * router.s_up_n + router.b_n


def decode_neuron_union(router: DecodeNeuronRouter, x_bd: jax.Array, active_b: jax.Array | None, out_dtype,
                        implementation: str | None = None) -> jax.Array:
  """`[N]` batch-union scores `sum_b active_b * relu(logits)` (`polar_jax.topk.union_scores`) of one layer's
  float decode router: the rank-r down-projection of `neuron_logits` (`neuron_low_rank`, XLA's dot: measured
  faster than `skinny_matmul` for its 4096 x 1024 at B32, 8.2 vs 9.9 us with the counters' zero-fill,
  on an H100), then the up-projection by `skinny_matmul` with the bias, the ReLU and the active
  rows' float32 column sums in its epilogue, cast to `out_dtype` (the `[B, N]` logits are never written, no reduce
  kernel follows). Equal to `union_scores(decode_neuron_logits(router, x_bd), active_b)` up to float32 summation
  order."""
  if router.s_down_r is not None:
    raise ValueError("decode_neuron_union needs float router weights; int8 routers take decode_neuron_logits")
  low_br = neuron_low_rank(router.w_down_dr, x_bd).astype(router.w_up_rn.dtype)
  weights_b = jnp.ones((x_bd.shape[0],), jnp.float32) if active_b is None else active_b.astype(jnp.float32)
  return pallas_kernels.skinny_matmul(low_br, router.w_up_rn, router.b_n, activation="relu", row_weights_M=weights_b,
                                      out_dtype=out_dtype, implementation=implementation).y


@dataclasses.dataclass
class Routers:
  """The routers of one model.

  Attributes:
    head: KV-group routers of every layer.
    neuron: neuron routers (ReLU MLPs only) or None.
    fingerprint: `ModelConfig.fingerprint()` of the model they were trained on.
    mlp_topk: `{batch_size: (k per layer)}` neuron budgets (empty without neuron routers).
    metadata: the contents of `metadata.json` (data, tokens, validation metrics).
  """

  head: HeadRouters
  neuron: NeuronRouters | None
  fingerprint: str
  mlp_topk: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def init(cls, config: ModelConfig, *, neuron_rank: int | None = None, seed: int = 0) -> "Routers":
    """Untrained routers shaped for `config` (neuron routers only for ReLU MLPs)."""
    rngs = nnx.Rngs(seed)
    head = HeadRouters(config.num_layers, config.hidden_size, config.num_kv_heads)
    neuron = None
    if has_neuron_mlp(config):
      rank = neuron_rank or default_neuron_rank(config.hidden_size)
      neuron = NeuronRouters(config.num_layers, config.hidden_size, config.intermediate_size, rank, rngs=rngs)
    return cls(head, neuron, config.fingerprint())

  def check_model(self, config: ModelConfig, source: str = "these routers") -> None:
    """Raises RouterMismatchError unless the routers were trained for a model with `config`'s architecture."""
    fp = config.fingerprint()
    if fp != self.fingerprint:
      trained = self.metadata.get("model", {})
      raise RouterMismatchError(
          f"{source} were trained for another model: router fingerprint {self.fingerprint} "
          f"({_describe(trained) or 'unknown architecture'}) != model fingerprint {fp} "
          f"({_describe(config.to_dict())}). Train routers for this model with polar-train-routers.")
    if self.head.num_layers != config.num_layers or self.head.num_groups != config.num_kv_heads:
      raise RouterMismatchError(
          f"{source} have {self.head.num_layers} layers x {self.head.num_groups} groups; the model has "
          f"{config.num_layers} x {config.num_kv_heads}")


class RouterMismatchError(ValueError):
  """Routers do not belong to the model they are used with (or their directory is unusable)."""


def _describe(d: dict) -> str:
  if not d:
    return ""
  return (f"{d.get('model_type')}, {d.get('num_layers')} layers, hidden {d.get('hidden_size')}, "
          f"{d.get('num_heads')} heads / {d.get('num_kv_heads')} KV groups")
