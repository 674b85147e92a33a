"""Per-layer sensitivity to attention sparsity, and per-layer budgets derived from it.

`layer_sensitivity` measures, for every layer l, the increase of the mean next-token NLL when *only* layer l keeps
k of its KV groups per token (chosen by the routers or the oracle) and every other layer is dense. It runs a full
forward pass in which the selected layer zeroes the attention context of each token's unselected groups before
o_proj (exactly what the decode step does to one token, applied to every token at once: the all_tokens semantics),
with the layer mask a dynamic input, so one compiled program serves all layers. It is a proxy to rank layers, cheap
enough for a CPU; budgets built from it are then measured with the engine semantics by `polar-eval --per-layer`.

`dense_budget(sensitivity, ...)` keeps the most sensitive layers dense: the smallest set whose summed (additive
approximation) NLL increase leaves the rest within a target perplexity ratio.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from polar_jax.attention import group_norms
from polar_jax.routers.modules import head_scores


@functools.partial(jax.jit, static_argnames=("graphdef", "k", "selector"))
def _masked_nll(graphdef, state, w_ldg, b_lg, tokens_bt, lengths_b, sparse_l, *, k, selector):
  """Per-token NLL `[B, T-1]` (position t predicts token t+1; invalid positions 0) with the layers in `sparse_l`
  restricted to each token's top-k groups."""
  model = nnx.merge(graphdef, state)
  b, t = tokens_bt.shape
  g = model.config.num_kv_heads
  h = model.embed_tokens(tokens_bt, jnp.broadcast_to(jnp.arange(t), (b, t)))
  for i, layer in enumerate(model.layers):
    x = layer.attn_norm(h) if layer.pre_norm else h
    a, _, ctx = layer.attn.forward(x, lengths_b, return_context=True)                  # ctx [B, T, Hq, D]
    if selector == "oracle":
      scores = group_norms(ctx, g)
    else:
      scores = head_scores(w_ldg[i], b_lg[i], x.reshape(b * t, -1)).reshape(b, t, g)
    top = jax.lax.top_k(scores, k)[1]
    keep = jnp.sum(jax.nn.one_hot(top, g, dtype=jnp.int32), axis=-2) > 0               # [B, T, G]
    keep_h = jnp.repeat(keep, model.config.num_heads // g, axis=-1)[..., None]
    a_sparse = layer.attn.o_proj(jnp.where(keep_h, ctx, 0).reshape(b, t, -1))
    a = jnp.where(sparse_l[i], a_sparse.astype(a.dtype), a)
    h = h + a if layer.pre_norm else layer.attn_norm(h + a)
    h = layer._mlp_block(h, layer.mlp)
  logp = jax.nn.log_softmax(model.logits(h)[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens_bt[:, 1:, None], axis=-1)[..., 0]
  valid = jnp.arange(1, t)[None, :] < lengths_b[:, None]
  return jnp.where(valid, nll, 0.0)


def layer_sensitivity(model, windows: Sequence[Sequence[int]], *, k: int, selector: str = "router", routers=None,
                      dense_layers: Sequence[int] = (0,), skip: int = 0, batch: int = 8,
                      progress: bool = False) -> dict:
  """Mean NLL (nats/token) with no sparse layer and with each single layer sparse.

  Args:
    windows: equal-length token windows (e.g. router training text).
    k: KV groups kept in the sparse layer.
    selector: "router" (needs `routers`) or "oracle".
    skip: the first `skip` positions of each window are not counted (context).

  Returns:
    `{"base": mean NLL dense, "delta": [L] NLL increase per layer (None for dense_layers), "tokens", "k",
    "selector"}`.
  """
  if selector not in ("router", "oracle"):
    raise ValueError(f"sensitivity selector must be 'router' or 'oracle', got {selector!r}")
  cfg = model.config
  if selector == "router":
    if routers is None:
      raise ValueError("selector 'router' needs routers")
    w, bias = jnp.asarray(routers.head.w_ldg[...]), jnp.asarray(routers.head.b_lg[...])
  else:
    w = jnp.zeros((cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads), jnp.float32)
    bias = jnp.zeros((cfg.num_layers, cfg.num_kv_heads), jnp.float32)
  arr = np.asarray(windows, np.int32)
  graphdef, state = nnx.split(model)
  layers = [None] + [i for i in range(cfg.num_layers) if i not in set(dense_layers)]
  totals = {}
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(layers) * -(-len(arr) // batch), desc=f"sensitivity {selector} k={k}", leave=False)
  count = 0
  for layer in layers:
    sparse = np.zeros((cfg.num_layers,), bool)
    if layer is not None:
      sparse[layer] = True
    s, count = 0.0, 0
    for start in range(0, len(arr), batch):
      chunk = arr[start:start + batch]
      nb = len(chunk)
      if nb < batch:
        chunk = np.concatenate([chunk, np.zeros((batch - nb, arr.shape[1]), np.int32)])
      lengths = np.full((batch,), arr.shape[1], np.int32)
      nll = np.asarray(_masked_nll(graphdef, state, w, bias, chunk, lengths, sparse, k=k, selector=selector))
      s += float(nll[:nb, skip:].sum())
      count += nll[:nb, skip:].size
      if bar is not None:
        bar.update(1)
    totals[layer] = s / count
  if bar is not None:
    bar.close()
  base = totals[None]
  delta = [None if i in set(dense_layers) else totals[i] - base for i in range(cfg.num_layers)]
  return {"base": base, "delta": delta, "tokens": count, "k": k, "selector": selector}


def dense_budget(delta: Sequence[float | None], ppl_ratio: float = 1.03) -> list[int]:
  """Layers to keep dense (most sensitive first) so that the summed NLL increase of the others stays within
  log(ppl_ratio) (additive approximation)."""
  items = sorted(((d, i) for i, d in enumerate(delta) if d is not None), reverse=True)
  budget = math.log(ppl_ratio)
  keep = []
  remaining = sum(max(d, 0.0) for d, _ in items)
  for d, i in items:
    if remaining <= budget:
      break
    keep.append(i)
    remaining -= max(d, 0.0)
  return keep


def sensitivity_report(model, tokenizer, *, selectors: Sequence[str], densities: Sequence[float], routers=None,
                       windows: int = 16, dense_layers: Sequence[int] = (0,), ppl_ratio: float = 1.03,
                       progress: bool = False) -> list[dict]:
  """Per-layer sensitivity on router training text (train split, 256-token windows, the first 64 positions not
  counted) for each selector in {router, oracle} and density < 1, with the dense-layer budget it suggests."""
  from polar_jax.evaluation.tasks import PPL_PREFIX, text_windows
  from polar_jax.sparsity import groups_for_density
  wins = [w for w, _ in text_windows(tokenizer, part="train", max_windows=windows)]
  g = model.config.num_kv_heads
  out = []
  for selector in [s for s in selectors if s in ("router", "oracle")]:
    for d in sorted({float(d) for d in densities if float(d) < 1.0}, reverse=True):
      k = groups_for_density(d, g)
      if k >= g:
        continue
      sens = layer_sensitivity(model, wins, k=k, selector=selector, routers=routers, dense_layers=dense_layers,
                               skip=PPL_PREFIX - 1, progress=progress)
      keep = dense_budget(sens["delta"], ppl_ratio)
      dense = sorted(set(dense_layers) | set(keep))
      sparse_layers = model.config.num_layers - len(dense)
      out.append({**sens, "density": d, "data": f"train split, {len(wins)} windows of 256 tokens",
                  "predicted_ppl_ratio_all_sparse": math.exp(sum(x for x in sens["delta"] if x is not None)),
                  "dense_for_ppl_ratio": ppl_ratio, "suggested_dense_layers": dense,
                  "per_layer": ",".join(f"{i}:1" for i in keep),
                  "average_density": (len(dense) * g + sparse_layers * k) / (model.config.num_layers * g)})
  return out
