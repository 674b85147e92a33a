"""What one decode step computes in each layer: typed selections, built by the decode-step objects.

Per layer a `LayerPlan(heads, neurons)`:
  * `heads` says which KV groups each row attends to:
      `DenseHeads()`                 every group (the dense path);
      `GroupIndices(idx_bk, count_b)` int32 `[B, K]` groups per row, already chosen (e.g. the random selector);
                                     with `count_b` (adaptive budgets) row b uses only `idx_bk[b, :count_b[b]]`
                                     (per shard with `count_bs` under balanced selection);
      `LinearRouter(w_dg, b_g, k)`   each row's top-k of `x @ w + b`, x the layer's normed attention input; the
                                     q|k|v projection kernel can compute these scores itself (`Attention.decode`);
                                     with `mass`, each row keeps the fewest of those (>= `min_groups`) whose
                                     softmax-of-scores share reaches `mass` (`mass_counts`);
      `OracleHeads(k)`               dense attention, then each row keeps its k groups of largest output norm
                                     (an evaluation upper bound; with `mass`, the fewest reaching that share of
                                     the sum of group norms);
  * `neurons` (ReLU MLPs only) is None for the dense MLP, a `NeuronUnion` (the batch-union neuron set of the
    layer's neuron router) or `NeuronIndices` (a given set): the neurons the sparse MLP gathers.
`shards > 1` (tensor parallelism): balanced per-shard selection, k / shards groups (ceil(k / shards) neurons) from
each of `shards` equal blocks (`polar_jax.sharding.balanced_topk`); adaptive budgets then count within each block
(each shard keeps the fewest of its k / shards groups reaching `mass` of its block's share).

These objects live inside one traced step (they hold arrays) and are never jit arguments themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp

from polar_jax.options import DecodeOptions
from polar_jax.routers.modules import DecodeNeuronRouter, decode_head_scores, decode_neuron_logits, decode_neuron_union
from polar_jax.sharding import balanced_topk, balanced_union_topk
from polar_jax.topk import topk_rows, union_topk


@dataclasses.dataclass(frozen=True)
class DenseHeads:
  """Every KV group: the dense attention path."""


@dataclasses.dataclass(frozen=True)
class GroupIndices:
  """int32 `[B, K]`: the KV groups each row attends to (balanced per shard under tensor parallelism); with
  `count_b` (int32 `[B]`, adaptive budgets) row b attends only to `idx_bk[b, :count_b[b]]`. A balanced selection
  over S shards with adaptive budgets counts per shard instead: `count_bs` (int32 `[B, S]`), row b attends to the
  first `count_bs[b, s]` of shard s's block of K / S slots."""

  idx_bk: jax.Array
  count_b: jax.Array | None = None
  count_bs: jax.Array | None = None

  def rows(self) -> "GroupIndices":
    """The one-device form (one count per row): per-shard counts become the row's total, the counted slots of
    every block moved to the front in their order (the same groups, the order the kernels' `group_count` needs)."""
    if self.count_bs is None:
      return self
    counted_bk = shard_count_mask(self.count_bs, self.idx_bk.shape[1])
    order_bk = jnp.argsort(~counted_bk, axis=1, stable=True)
    return GroupIndices(jnp.take_along_axis(self.idx_bk, order_bk, axis=1),
                        jnp.sum(self.count_bs, axis=1).astype(jnp.int32))


def shard_count_mask(count_bs: jax.Array, k: int) -> jax.Array:
  """bool `[B, K]`: slot j of shard s's block of K / S slots is counted (j < `count_bs[b, s]`)."""
  b, shards = count_bs.shape
  return (jnp.arange(k // shards)[None, None, :] < count_bs[:, :, None]).reshape(b, k)


def shard_mass_counts(weights_bg: jax.Array, idx_bk: jax.Array, mass: float, min_groups: int, shards: int
                      ) -> jax.Array:
  """int32 `[B, shards]`: `mass_counts` within each shard's block of G / shards groups and its K / shards slots of
  a balanced selection (`balanced_topk`): the share is of the block's weight, the bounds
  [min(min_groups, K / shards), K / shards]."""
  b, g = weights_bg.shape
  k = idx_bk.shape[1]
  gl, kl = g // shards, k // shards
  local_bk = idx_bk.reshape(b, shards, kl) - (jnp.arange(shards, dtype=idx_bk.dtype) * gl)[None, :, None]
  counts = mass_counts(weights_bg.reshape(b * shards, gl), local_bk.reshape(b * shards, kl), mass, min_groups)
  return counts.reshape(b, shards)


def mass_counts(weights_bg: jax.Array, idx_bk: jax.Array, mass: float, min_groups: int = 1) -> jax.Array:
  """int32 `[B]`: per row, the fewest of its slots `idx_bk` (sorted by decreasing weight) whose share of the row's
  total weight over all G groups reaches `mass`, clamped to [min(min_groups, K), K]. `weights_bg` are
  non-negative (softmax probabilities, group norms); summed in float32.

  The test is on what is left out: a slot is added while the weight of the later slots and of every group outside
  `idx_bk` exceeds (1 - mass) x the total, summed from the small weights up. A mass near 1 (a peaked softmax needs
  one: 1 - 1e-6, say) then counts as the float64 calibration does (`routers.adaptive.counts_for_mass`); 1 - a
  cumulative float32 share would round it to 0."""
  w_bg = weights_bg.astype(jnp.float32)
  b, k = idx_bk.shape
  top_bk = jnp.take_along_axis(w_bg, idx_bk, axis=-1)
  listed_bg = jnp.zeros(w_bg.shape, bool).at[jnp.arange(b)[:, None], idx_bk].set(True)
  outside_b = jnp.sum(jnp.where(listed_bg, 0.0, w_bg), axis=-1)
  later_bk = jnp.cumsum(top_bk[:, :0:-1], axis=-1)[:, ::-1]     # [B, K - 1]: weight of the slots after slot j
  left_bk = later_bk + outside_b[:, None]
  limit_b = (1.0 - float(mass)) * jnp.sum(w_bg, axis=-1)
  needed_b = 1 + jnp.sum(left_bk > limit_b[:, None], axis=-1)
  return jnp.clip(needed_b, min(min_groups, k), k).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class LinearRouter:
  """A learned head router: each row keeps its `k` groups of largest score `x @ w_dg + b_g`.

  `side` is the same weight zero-padded to whole column tiles (`pallas_kernels.skinny_matmul.side_width`), which
  the q|k|v kernel's side programs stream; None where the kernel cannot take it (tensor parallelism).
  `mass` (adaptive budgets): each row keeps only the fewest of its top-k groups whose share of the softmax of its
  G scores reaches `mass`, at least `min_groups` (`mass_counts`); None keeps all k."""

  w_dg: jax.Array
  b_g: jax.Array
  k: int
  shards: int = 1
  side: tuple[jax.Array, jax.Array] | None = None
  mass: float | None = None
  min_groups: int = 1

  @property
  def num_groups(self) -> int:
    return self.w_dg.shape[1]

  def pick(self, scores_bp: jax.Array) -> jax.Array:
    """int32 `[B, k]` from scores of the first G columns (a zero-padded side product may be wider)."""
    return balanced_topk(scores_bp[:, :self.num_groups], self.k, self.shards)

  def select(self, x_bd: jax.Array) -> jax.Array:
    """int32 `[B, k]`: the router's own dot on the normed attention input, then the per-row top-k."""
    return self.pick(decode_head_scores(self.w_dg, self.b_g, x_bd))

  def choose(self, scores_bp: jax.Array) -> GroupIndices:
    """The groups of scores `[B, >= G]` (first G columns): the top-k by decreasing score, and with `mass` the
    count per row."""
    idx_bk = self.pick(scores_bp)
    if self.mass is None:
      return GroupIndices(idx_bk)
    scores_bg = scores_bp[:, :self.num_groups].astype(jnp.float32)
    if self.shards > 1:   # each shard's share of its own block's softmax
      b = scores_bg.shape[0]
      probs_bg = jax.nn.softmax(scores_bg.reshape(b, self.shards, -1), axis=-1).reshape(b, -1)
      return GroupIndices(idx_bk, count_bs=shard_mass_counts(probs_bg, idx_bk, self.mass, self.min_groups,
                                                             self.shards))
    probs_bg = jax.nn.softmax(scores_bg, axis=-1)
    return GroupIndices(idx_bk, mass_counts(probs_bg, idx_bk, self.mass, self.min_groups))

  def groups(self, x_bd: jax.Array) -> GroupIndices:
    """`choose` on the router's own dot on the normed attention input."""
    return self.choose(decode_head_scores(self.w_dg, self.b_g, x_bd))


@dataclasses.dataclass(frozen=True)
class OracleHeads:
  """Dense attention, then each row keeps its `k` groups of largest output norm (zeroing the others' heads); with
  `mass`, only the fewest of those whose share of the row's summed group norms reaches `mass` (>= `min_groups`)."""

  k: int
  shards: int = 1
  mass: float | None = None
  min_groups: int = 1


HeadSelection = Union[DenseHeads, GroupIndices, LinearRouter, OracleHeads]
DENSE_HEADS = DenseHeads()


@dataclasses.dataclass(frozen=True)
class NeuronUnion:
  """A ReLU MLP over the batch-union neuron set: the `k` neurons of largest `sum_b active_b * relu(logits)`,
  logits from the layer's neuron router on its normed attention input (per shard under tensor parallelism)."""

  router: DecodeNeuronRouter
  k: int
  active_b: jax.Array | None = None
  shards: int = 1

  def indices(self, x_bd: jax.Array, options: DecodeOptions) -> jax.Array:
    """int32 `[k]` neuron indices (ascending with the radix method)."""
    impl, method, dtype = options.implementation, options.union_method, options.union_jnp_dtype
    if self.shards == 1 and options.fused_projections and self.router.s_down_r is None:
      # the union scores from the router's up-projection kernel: the [B, N] logits are never written
      scores_n = decode_neuron_union(self.router, x_bd, self.active_b, dtype, impl)
      return topk_rows(scores_n[None], self.k, method, impl)[0]
    logits_bn = decode_neuron_logits(self.router, x_bd)
    if self.shards > 1:
      return balanced_union_topk(logits_bn, self.active_b, self.k, self.shards, method, impl, dtype)
    return union_topk(logits_bn, self.active_b, self.k, method, impl, dtype)


@dataclasses.dataclass(frozen=True)
class NeuronIndices:
  """A ReLU MLP over a given neuron set, int32 `[k]` (e.g. a precomputed selection for timing the MLP alone)."""

  idx_k: jax.Array
  shards: int = 1

  def indices(self, x_bd: jax.Array, options: DecodeOptions) -> jax.Array:
    del x_bd, options
    return self.idx_k


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """One layer's selection in a decode step."""

  heads: HeadSelection = DENSE_HEADS
  neurons: NeuronUnion | NeuronIndices | None = None


DENSE_PLAN = LayerPlan()


def keep_top_groups(ctx_bhd: jax.Array, num_kv_heads: int, k: int, shards: int = 1, mass: float | None = None,
                    min_groups: int = 1) -> jax.Array:
  """The oracle: zeroes the query heads of all but each row's k groups of largest output norm (`shards > 1`:
  balanced per-shard selection, k / shards groups from each of `shards` equal blocks of groups; `mass`: only the
  fewest of those reaching that share of the summed norms, `mass_counts`)."""
  b, hq, _ = ctx_bhd.shape
  norms_bg = group_norms(ctx_bhd, num_kv_heads)
  top_bk = balanced_topk(norms_bg, k, shards)
  if mass is None:
    keep_bg = jnp.zeros((b, num_kv_heads), bool).at[jnp.arange(b)[:, None], top_bk].set(True)
  else:
    counted_bk = shard_count_mask(shard_mass_counts(norms_bg, top_bk, mass, min_groups, shards), k)
    keep_bg = jnp.any((top_bk[:, :, None] == jnp.arange(num_kv_heads)[None, None, :]) & counted_bk[:, :, None],
                      axis=1)
  keep_bh = jnp.repeat(keep_bg, hq // num_kv_heads, axis=1)
  return jnp.where(keep_bh[..., None], ctx_bhd, jnp.zeros_like(ctx_bhd))


def group_norms(ctx_bhd: jax.Array, num_kv_heads: int) -> jax.Array:
  """float32 `[B, G]` (leading dims kept): L2 norm of each KV group's query-head contexts before o_proj."""
  *lead, hq, d = ctx_bhd.shape
  c = ctx_bhd.astype(jnp.float32).reshape(*lead, num_kv_heads, (hq // num_kv_heads) * d)
  return jnp.sqrt(jnp.sum(c * c, axis=-1))
