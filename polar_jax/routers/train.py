"""Router training: weighted BCE, optax AdamW, all layers at once (`jax.vmap` over layers), early stopping
on validation recall.

Head routers: a KV group is positive for a token if it is among that token's top `train_groups` groups
by attention-output norm (`top_groups_mask`). Validation recall = |router top-k ∩ label set| / k at
k = train_groups, i.e. exactly what the engine's per-row `lax.top_k` keeps.

Neuron routers (ReLU MLPs): a neuron is positive where it fires; validation recall = fired neurons with a
positive router logit / fired neurons.

Positives are weighted against their rarity: weight (1 - p) / p with p the layer's positive rate
(clipped to [0.005, 0.5]), negatives weight 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from polar_jax.routers.collect import RouterData
from polar_jax.routers.modules import HeadRouters, NeuronRouters, head_scores, neuron_logits


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """Optimisation settings.

  Measured on SmolLM2-135M (100k training tokens): lr 1e-2 / batch 512 reaches validation recall 0.915 at
  2 of 3 groups in 8 epochs; the shipped routers used lr 3e-3 / batch 1024 for 20 epochs (0.9152).
  """

  batch_size: int = 512
  learning_rate: float = 1e-2
  weight_decay: float = 0.01
  max_epochs: int = 20
  patience: int = 3          # epochs without validation improvement before stopping
  min_delta: float = 1e-4    # improvement that resets the patience
  seed: int = 0


def top_groups_mask(norms_g: jax.Array, k: int) -> jax.Array:
  """bool mask (same shape) of the k largest entries along the last axis (ties: lower index)."""
  idx = jax.lax.top_k(norms_g, k)[1]
  return jnp.sum(jax.nn.one_hot(idx, norms_g.shape[-1], dtype=jnp.int32), axis=-2) > 0


def positive_weight(rate: float) -> float:
  """Weight of a positive label when positives occur at `rate`: (1 - p) / p, p clipped to [0.005, 0.5]."""
  p = min(max(rate, 0.005), 0.5)
  return (1.0 - p) / p


def weighted_bce(logits, labels, pos_weight):
  """Mean of `pos_weight * y * softplus(-s) + (1 - y) * softplus(s)`."""
  y = labels.astype(jnp.float32)
  return jnp.mean(pos_weight * y * jax.nn.softplus(-logits) + (1.0 - y) * jax.nn.softplus(logits))


def _head_loss(params, x_bld, norms_blg, k, pos_weight):
  w, b = params

  def layer_loss(w_dg, b_g, x_bd, norms_bg):
    return weighted_bce(head_scores(w_dg, b_g, x_bd), top_groups_mask(norms_bg, k), pos_weight)

  return jnp.mean(jax.vmap(layer_loss, in_axes=(0, 0, 1, 1))(w, b, x_bld, norms_blg))


def _neuron_loss(params, x_bld, fired_bln, pos_weight_l):
  wd, wu, b = params

  def layer_loss(wd_dr, wu_rn, b_n, x_bd, fired_bn, pw):
    return weighted_bce(neuron_logits(wd_dr, wu_rn, b_n, x_bd), fired_bn, pw)

  return jnp.mean(jax.vmap(layer_loss, in_axes=(0, 0, 0, 1, 1, 0))(wd, wu, b, x_bld, fired_bln, pos_weight_l))


def _make_step(loss_fn, optimizer):
  @jax.jit
  def step(params, opt_state, *batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def head_hits(w_ldg, b_lg, x_bld, norms_blg, k_pred: int, k_label: int):
  """int32 `[L]` per layer: sum over tokens of |router top-k_pred ∩ true top-k_label|."""
  def layer(w_dg, b_g, x_bd, norms_bg):
    pred = top_groups_mask(head_scores(w_dg, b_g, x_bd), k_pred)
    return jnp.sum(pred & top_groups_mask(norms_bg, k_label))
  return jax.vmap(layer, in_axes=(0, 0, 1, 1))(w_ldg, b_lg, x_bld, norms_blg)


_head_hits = jax.jit(head_hits, static_argnames=("k_pred", "k_label"))


def head_metrics(head: HeadRouters, data: RouterData, k_label: int, ks: tuple[int, ...], batch_size: int = 4096):
  """Per-layer recall and precision of the router's top-k against the top-`k_label` label set, for each k.

  Returns:
    `{k: {"recall": [L], "precision": [L]}}` (numpy), with the token count under `"tokens"`.
  """
  w, b = jnp.asarray(head.w_ldg[...]), jnp.asarray(head.b_lg[...])
  hits = {k: 0 for k in ks}
  n = 0
  for batch in data.batches(batch_size, fields=("x", "norms")):
    x, norms = jnp.asarray(batch["x"]), jnp.asarray(batch["norms"])
    for k in ks:
      hits[k] = hits[k] + np.asarray(_head_hits(w, b, x, norms, k_pred=k, k_label=k_label))
    n += len(batch["x"])
  out: dict[Any, Any] = {"tokens": n}
  for k in ks:
    h = np.asarray(hits[k], np.float64)
    out[k] = {"recall": h / (n * k_label), "precision": h / (n * k)}
  return out


@jax.jit
def _neuron_counts(wd, wu, b, x_bld, fired_bln):
  def layer(wd_dr, wu_rn, b_n, x_bd, fired_bn):
    pred = neuron_logits(wd_dr, wu_rn, b_n, x_bd) > 0
    return jnp.stack([jnp.sum(pred & fired_bn), jnp.sum(fired_bn), jnp.sum(pred)])
  return jax.vmap(layer, in_axes=(0, 0, 0, 1, 1))(wd, wu, b, x_bld, fired_bln)


def unpack_fired(packed: np.ndarray, num_neurons: int) -> np.ndarray:
  """bool `[..., N]` from the collector's bit-packed `fired`."""
  return np.unpackbits(packed, axis=-1, count=num_neurons).astype(bool)


def neuron_metrics(neuron: NeuronRouters, data: RouterData, batch_size: int = 512):
  """Per-layer recall, precision and firing rate of `logit > 0` against the neurons that fire."""
  n_neurons = neuron.num_neurons
  params = tuple(jnp.asarray(p[...]) for p in (neuron.w_down_ldr, neuron.w_up_lrn, neuron.b_ln))
  counts, n = 0, 0
  for batch in data.batches(batch_size, fields=("x", "fired")):
    fired = jnp.asarray(unpack_fired(batch["fired"], n_neurons))
    counts = counts + np.asarray(_neuron_counts(*params, jnp.asarray(batch["x"]), fired), np.float64)
    n += len(batch["x"])
  tp, pos, pred = counts[:, 0], counts[:, 1], counts[:, 2]
  return {"tokens": n, "recall": tp / np.maximum(pos, 1), "precision": tp / np.maximum(pred, 1),
          "firing_rate": pos / (n * n_neurons)}


def _fit(params, loss_fn, batch_fn, data: RouterData, evaluate: Callable[[Any], float], settings: TrainSettings,
         desc: str, progress: bool):
  """Generic loop: AdamW epochs over shuffled chunks, best-by-validation parameters, early stopping."""
  from tqdm.auto import tqdm
  optimizer = optax.adamw(settings.learning_rate, weight_decay=settings.weight_decay)
  opt_state = optimizer.init(params)
  step = _make_step(loss_fn, optimizer)
  rng = np.random.default_rng(settings.seed)
  best, best_params, bad_epochs, history = -math.inf, params, 0, []
  steps_per_epoch = max(1, data.tokens // settings.batch_size)
  for epoch in range(settings.max_epochs):
    losses = []
    with tqdm(total=steps_per_epoch, desc=f"{desc} epoch {epoch + 1}", disable=not progress, leave=False) as bar:
      for batch in data.batches(settings.batch_size, rng, drop_last=True):
        params, opt_state, loss = step(params, opt_state, *batch_fn(batch))
        losses.append(loss)
        bar.update(1)
    score = float(evaluate(params))
    history.append({"epoch": epoch + 1, "loss": float(np.mean(jax.device_get(losses))) if losses else None,
                    "val_recall": score})
    if progress:
      print(f"{desc} epoch {epoch + 1}: loss {history[-1]['loss']:.4f}, validation recall {score:.4f}")
    if score > best + settings.min_delta:
      best, best_params, bad_epochs = score, params, 0
    else:
      bad_epochs += 1
      if bad_epochs >= settings.patience:
        break
  return best_params, {"best_val_recall": best, "epochs": len(history), "history": history}


def train_head_routers(train: RouterData, val: RouterData, num_layers: int, hidden: int, num_groups: int,
                       train_groups: int, settings: TrainSettings = TrainSettings(), *, progress: bool = True):
  """Trains all layers' head routers together; returns (HeadRouters, training summary)."""
  head = HeadRouters(num_layers, hidden, num_groups)
  params = (jnp.asarray(head.w_ldg[...]), jnp.asarray(head.b_lg[...]))
  pos_weight = positive_weight(train_groups / num_groups)

  def loss_fn(p, x, norms):
    return _head_loss(p, x, norms, train_groups, pos_weight)

  def batch_fn(b):
    return jnp.asarray(b["x"]), jnp.asarray(b["norms"])

  def evaluate(p):
    head.w_ldg[...], head.b_lg[...] = p
    return float(np.mean(head_metrics(head, val, train_groups, (train_groups,))[train_groups]["recall"]))

  best, summary = _fit(params, loss_fn, batch_fn, _Fields(train, ("x", "norms")), evaluate, settings,
                       "head routers", progress)
  head.w_ldg[...], head.b_lg[...] = best
  summary.update(train_groups=train_groups, positive_weight=pos_weight)
  return head, summary


def train_neuron_routers(train: RouterData, val: RouterData, num_layers: int, hidden: int, num_neurons: int,
                         rank: int, settings: TrainSettings = TrainSettings(), *, progress: bool = True):
  """Trains all layers' neuron routers together; returns (NeuronRouters, training summary)."""
  neuron = NeuronRouters(num_layers, hidden, num_neurons, rank, rngs=nnx.Rngs(settings.seed))
  params = tuple(jnp.asarray(p[...]) for p in (neuron.w_down_ldr, neuron.w_up_lrn, neuron.b_ln))
  rates = firing_rates(train, num_layers, num_neurons)
  pos_weight_l = jnp.asarray([positive_weight(r) for r in rates], jnp.float32)

  def loss_fn(p, x, fired):
    return _neuron_loss(p, x, fired, pos_weight_l)

  def batch_fn(b):
    return jnp.asarray(b["x"]), jnp.asarray(unpack_fired(b["fired"], num_neurons))

  def evaluate(p):
    _assign_neuron(neuron, p)
    return float(np.mean(neuron_metrics(neuron, val)["recall"]))

  best, summary = _fit(params, loss_fn, batch_fn, _Fields(train, ("x", "fired")), evaluate, settings,
                       "neuron routers", progress)
  _assign_neuron(neuron, best)
  summary.update(rank=rank, train_firing_rate=[float(r) for r in rates])
  return neuron, summary


def _assign_neuron(neuron: NeuronRouters, p):
  neuron.w_down_ldr[...], neuron.w_up_lrn[...], neuron.b_ln[...] = p


def firing_rates(data: RouterData, num_layers: int, num_neurons: int, max_tokens: int = 65536):
  """Per-layer firing rate over (up to `max_tokens` of) the training data."""
  total, n = np.zeros(num_layers), 0
  for batch in data.batches(4096, fields=("fired",)):
    total += unpack_fired(batch["fired"], num_neurons).sum(axis=(0, 2))
    n += len(batch["fired"])
    if n >= max_tokens:
      break
  return total / max(n * num_neurons, 1)


@dataclasses.dataclass
class _Fields:
  """A RouterData view that reads only some fields."""

  data: RouterData
  fields: tuple[str, ...]

  @property
  def tokens(self) -> int:
    return self.data.tokens

  def batches(self, batch_size, rng=None, drop_last=False):
    return self.data.batches(batch_size, rng, fields=self.fields, drop_last=drop_last)
