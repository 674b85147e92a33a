"""Neuron budget calibration: per layer and decode batch size, the neuron top-k the engine uses.

For batch size B, held-out tokens are split at random into batches of B rows. For each batch the engine
selects `top_k(sum_b relu(router logits))` (the sums rounded as the decode step ranks them,
`polar_jax.topk.union_scores`); the batch's true union is every neuron that fires in any row.
The budget is the smallest multiple of 128 whose mean recall of the union over batches reaches the target
(0.99), capped at N. At inference a budget above `SparsityConfig.mlp_dense_above` x N runs the dense MLP
(`polar_jax.sparsity`).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from polar_jax import topk
from polar_jax.routers.modules import NeuronRouters, neuron_logits

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TARGET_RECALL = 0.99
STEP = 128
MAX_BATCHES = 64


def union_recall_curve(scores_mn: np.ndarray, union_mn: np.ndarray) -> np.ndarray:
  """Mean over batches of recall(k) = |top-k(scores) ∩ union| / |union| for k = 1..N (empty union: 1)."""
  order = np.argsort(-scores_mn, axis=1, kind="stable")
  hits = np.cumsum(np.take_along_axis(union_mn, order, axis=1), axis=1)
  size = union_mn.sum(axis=1, keepdims=True)
  return np.where(size > 0, hits / np.maximum(size, 1), 1.0).mean(axis=0)


def smallest_budget(curve_n: np.ndarray, target: float = TARGET_RECALL, step: int = STEP) -> int:
  """Smallest multiple of `step` (capped at N) whose recall reaches `target` (N if none does)."""
  n = len(curve_n)
  for k in range(step, n + step, step):
    k = min(k, n)
    if curve_n[k - 1] >= target - 1e-12:
      return k
  return n


@jax.jit
def _batch_scores(wd_dr, wu_rn, b_n, x_mbd):
  """float32 `[M, N]`: each batch's union scores as the decode step ranks them with the default options
  (`polar_jax.topk.union_scores`, rounded to bf16)."""
  scores = jax.vmap(lambda x_bd: topk.union_scores(neuron_logits(wd_dr, wu_rn, b_n, x_bd), None))(x_mbd)
  return scores.astype(jnp.float32)


def calibrate_budgets(neuron: NeuronRouters, x_tld: np.ndarray, fired_tln: np.ndarray, *,
                      batch_sizes=BATCH_SIZES, target: float = TARGET_RECALL, seed: int = 0,
                      max_batches: int = MAX_BATCHES):
  """The neuron budget table from held-out tokens.

  Args:
    neuron: trained neuron routers.
    x_tld: router inputs `[T, L, d]`; fired_tln: bool `[T, L, N]` true firing.
    batch_sizes: decode batch sizes to calibrate (sizes with fewer than one full batch of tokens are skipped).

  Returns:
    (`{batch_size: (k per layer)}`, `{batch_size: {"union": [L] mean union size, "recall": [L] at k}}`).
  """
  t, num_layers, _ = x_tld.shape
  rng = np.random.default_rng(seed)
  table, stats = {}, {}
  for bs in batch_sizes:
    m = min(max_batches, t // bs)
    if m == 0:
      continue
    rows = rng.permutation(t)[:m * bs].reshape(m, bs)
    ks, unions, recalls = [], [], []
    for layer in range(num_layers):
      scores = np.asarray(_batch_scores(neuron.w_down_ldr[layer], neuron.w_up_lrn[layer], neuron.b_ln[layer],
                                        jnp.asarray(x_tld[rows, layer], jnp.float32)))
      union = fired_tln[rows, layer].any(axis=1)
      curve = union_recall_curve(scores, union)
      k = smallest_budget(curve, target)
      ks.append(k)
      unions.append(float(union.sum(axis=1).mean()))
      recalls.append(float(curve[k - 1]))
    table[bs] = tuple(ks)
    stats[bs] = {"union": unions, "recall": recalls}
  return table, stats
