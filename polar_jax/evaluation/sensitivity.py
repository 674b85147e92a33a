"""Per-layer sensitivity to attention sparsity, and per-layer budgets derived from it.

`layer_sensitivity` measures, for every layer l, the increase of the mean next-token NLL when *only* layer l keeps
k of its KV groups per token (chosen by the routers or the oracle) and every other layer is dense. It runs a full
forward pass in which the selected layer zeroes the attention context of each token's unselected groups before
o_proj (exactly what the decode step does to one token, applied to every token at once: the all_tokens semantics),
with the layer mask a dynamic input, so one compiled program serves all layers. It is a proxy to rank layers, cheap
enough for a CPU; budgets built from it are then measured with the engine semantics by `polar-eval --per-layer`.

`plan_budget` turns the single-layer sensitivities into a per-layer budget (additive model, dynamic programming):
the same number of KV groups as a uniform density, or the fewest groups within a perplexity target; `budget_nll`
then measures any per-layer budget jointly. With `sparse_from = P` (the first P tokens dense, the rest sparse) the
masked forward is exactly the engine's semantics for the perplexity windows (tested against `score_requests`), so
budgets are planned on router training text and then measured on held-out text by `polar-eval --per-layer`.
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


@functools.partial(jax.jit, static_argnames=("graphdef", "selector"))
def _masked_nll(graphdef, state, w_ldg, b_lg, tokens_bt, lengths_b, k_l, sparse_from, *, selector):
  """Per-token NLL `[B, T-1]` (position t predicts token t+1; invalid positions 0) when layer l keeps each token's
  top-`k_l[l]` groups (all groups where `k_l[l] >= G`) at positions >= `sparse_from` (dense before)."""
  model = nnx.merge(graphdef, state)
  b, t = tokens_bt.shape
  g = model.config.num_kv_heads
  h = model.embed_tokens(tokens_bt, jnp.broadcast_to(jnp.arange(t), (b, t)))
  sparse_pos = (jnp.arange(t) >= sparse_from)[None, :, None]                           # [1, T, 1]
  for i, layer in enumerate(model.layers):
    x = layer.attn_norm(h) if layer.pre_norm else h
    a, _, ctx = layer.attn.forward(x, lengths_b, return_context=True)                  # ctx [B, T, Hq, D]
    if selector == "oracle":
      scores = group_norms(ctx, g)
    else:
      scores = head_scores(w_ldg[i], b_lg[i], x.reshape(b * t, -1)).reshape(b, t, g)
    rank = jnp.argsort(jnp.argsort(-scores, axis=-1, stable=True), axis=-1)            # 0 = best (ties: lower g)
    keep = (rank < k_l[i]) | ~sparse_pos                                                # [B, T, G]
    keep_h = jnp.repeat(keep, model.config.num_heads // g, axis=-1)[..., None]
    a_sparse = layer.attn.o_proj(jnp.where(keep_h, ctx, 0).reshape(b, t, -1))
    a = jnp.where(k_l[i] < g, a_sparse.astype(a.dtype), a)
    h = h + a if layer.pre_norm else layer.attn_norm(h + a)
    h = layer._mlp_block(h, layer.mlp)
  logp = jax.nn.log_softmax(model.logits(h)[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens_bt[:, 1:, None], axis=-1)[..., 0]
  valid = jnp.arange(1, t)[None, :] < lengths_b[:, None]
  return jnp.where(valid, nll, 0.0)


def _router_arrays(model, selector, routers):
  cfg = model.config
  if selector not in ("router", "oracle"):
    raise ValueError(f"sensitivity selector must be 'router' or 'oracle', got {selector!r}")
  if selector == "router":
    if routers is None:
      raise ValueError("selector 'router' needs routers")
    return jnp.asarray(routers.head.w_ldg[...]), jnp.asarray(routers.head.b_lg[...])
  return (jnp.zeros((cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads), jnp.float32),
          jnp.zeros((cfg.num_layers, cfg.num_kv_heads), jnp.float32))


def budget_nll(model, windows: Sequence[Sequence[int]], k_per_layer: Sequence[int], *, selector: str = "router",
               routers=None, sparse_from: int = 0, batch: int = 8) -> tuple[float, int]:
  """(mean NLL over the positions predicting tokens `sparse_from + 1 ...`, their count) with layer l keeping
  `k_per_layer[l]` groups per token (>= num_kv_heads: dense).

  `sparse_from = 0` is the all_tokens semantics; `sparse_from = P` equals engine mode with the first P tokens
  prefilled densely and the rest teacher-forced through the decode step (a decode token's K/V come from its own,
  sparsity-affected hidden states, as here), so it predicts `polar-eval` perplexity on the same windows.
  """
  w, bias = _router_arrays(model, selector, routers)
  arr = np.asarray(windows, np.int32)
  graphdef, state = nnx.split(model)
  k_l = np.asarray(k_per_layer, np.int32)
  total, count = 0.0, 0
  skip = max(0, sparse_from - 1)       # position t predicts token t + 1
  for start in range(0, len(arr), batch):
    chunk = arr[start:start + batch]
    nb = len(chunk)
    if nb < batch:
      chunk = np.concatenate([chunk, np.zeros((batch - nb, arr.shape[1]), np.int32)])
    lengths = np.full((batch,), arr.shape[1], np.int32)
    nll = np.asarray(_masked_nll(graphdef, state, w, bias, chunk, lengths, k_l, np.int32(sparse_from),
                                 selector=selector))
    total += float(nll[:nb, skip:].sum())
    count += nll[:nb, skip:].size
  return total / count, count


def layer_sensitivity(model, windows: Sequence[Sequence[int]], *, k: int, selector: str = "router", routers=None,
                      dense_layers: Sequence[int] = (0,), sparse_from: int = 0, batch: int = 8,
                      progress: bool = False) -> dict:
  """Mean NLL (nats/token) with no sparse layer and with each single layer keeping k groups (`budget_nll`).

  Returns:
    `{"base": mean NLL dense, "delta": [L] NLL increase per layer (None for dense_layers), "tokens", "k",
    "selector", "sparse_from"}`.
  """
  cfg = model.config
  g = cfg.num_kv_heads
  layers = [None] + [i for i in range(cfg.num_layers) if i not in set(dense_layers)]
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(layers), desc=f"sensitivity {selector} k={k}", leave=False)
  totals, count = {}, 0
  for layer in layers:
    ks = [g] * cfg.num_layers
    if layer is not None:
      ks[layer] = k
    totals[layer], count = budget_nll(model, windows, ks, selector=selector, routers=routers,
                                      sparse_from=sparse_from, batch=batch)
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  base = totals[None]
  delta = [None if i in set(dense_layers) else totals[i] - base for i in range(cfg.num_layers)]
  return {"base": base, "delta": delta, "tokens": count, "k": k, "selector": selector, "sparse_from": sparse_from}


def plan_budget(delta_by_k: dict[int, Sequence[float | None]], num_groups: int, *, total_groups: int | None = None,
                max_nll: float | None = None) -> list[int]:
  """Groups to keep per layer from single-layer sensitivities (additive model), by dynamic programming.

  Args:
    delta_by_k: `{k: [L] NLL increase with only that layer at k}` for each k < G (None: a layer kept dense).
    total_groups: keep exactly this many groups over all layers (minimise the predicted NLL increase), or
    max_nll: the fewest groups whose predicted NLL increase is at most this.

  Returns:
    k per layer (G = dense).
  """
  ks = sorted(delta_by_k)
  num_layers = len(next(iter(delta_by_k.values())))
  fixed = [i for i in range(num_layers) if any(delta_by_k[k][i] is None for k in ks)]
  free = [i for i in range(num_layers) if i not in fixed]
  cost = lambda i, k: 0.0 if k >= num_groups else max(0.0, float(delta_by_k[k][i]))
  best = {0: (0.0, ())}      # groups used by free layers -> (predicted NLL increase, ks)
  for i in free:
    nxt = {}
    for used, (c, chosen) in best.items():
      for k in ks + [num_groups]:
        u, v = used + k, c + cost(i, k)
        if u not in nxt or v < nxt[u][0] - 1e-15:
          nxt[u] = (v, chosen + (k,))
    best = nxt
  base = len(fixed) * num_groups
  if total_groups is not None:
    if total_groups - base not in best:
      raise ValueError(f"cannot keep exactly {total_groups} groups")
    chosen = best[total_groups - base][1]
  elif max_nll is not None:
    ok = sorted(u for u, (c, _) in best.items() if c <= max_nll + 1e-15)
    chosen = best[ok[0]][1]
  else:
    raise ValueError("give total_groups or max_nll")
  out = [num_groups] * num_layers
  for i, k in zip(free, chosen):
    out[i] = k
  return out


def density_of(k: int, num_groups: int) -> float:
  """The 2-decimal density that keeps k of `num_groups` groups (`sparsity.groups_for_density` maps it back to k)."""
  return 1 if k >= num_groups else round(k / num_groups + 0.005, 2)


def budget_spec(ks: Sequence[int], num_groups: int, default_k: int) -> str:
  """`--per-layer` text for a plan: the layers whose k differs from `default_k`, as "layer:density"."""
  return ",".join(f"{i}:{density_of(k, num_groups):g}" for i, k in enumerate(ks) if k != default_k and i > 0)


def sensitivity_report(model, tokenizer, *, selectors: Sequence[str], densities: Sequence[float], routers=None,
                       windows: int = 16, dense_layers: Sequence[int] = (0,),
                       ppl_ratio: float | Sequence[float] = 1.03, progress: bool = False) -> list[dict]:
  """Per-layer sensitivity on router training text (train split, 256-token windows; engine semantics: the first
  64 tokens dense, the rest sparse and scored) for each selector in {router, oracle} at every k < G, and per-layer
  budgets planned from it (`plan_budget`), each checked with one joint `budget_nll` pass:

  * `"equal_cost"` for each density < 1: the same total KV groups as the uniform density (layer 0 dense);
  * `"ppl-<p>pct"` for each ratio in `ppl_ratio` (a float or a sequence, e.g. (1.03, 1.1)): the fewest groups whose
    predicted perplexity (additive model) stays within that ratio of dense.
  """
  from polar_jax.evaluation.tasks import PPL_PREFIX, text_windows
  from polar_jax.sparsity import SparsityConfig
  wins = [w for w, _ in text_windows(tokenizer, part="train", max_windows=windows)]
  cfg = model.config
  g = cfg.num_kv_heads
  ratios = [float(ppl_ratio)] if np.ndim(ppl_ratio) == 0 else [float(r) for r in ppl_ratio]
  if not ratios or min(ratios) <= 1.0:
    raise ValueError(f"perplexity targets must be ratios > 1 (e.g. 1.03), got {ppl_ratio!r}")
  out = []
  for selector in [s for s in selectors if s in ("router", "oracle")]:
    sens = {k: layer_sensitivity(model, wins, k=k, selector=selector, routers=routers, dense_layers=dense_layers,
                                 sparse_from=PPL_PREFIX, progress=progress) for k in range(1, g)}
    base = sens[1]["base"]
    common = {"selector": selector, "data": f"router training text (train split), {len(wins)} windows of 256 "
              f"tokens, first {PPL_PREFIX} dense", "tokens": sens[1]["tokens"], "dense_nll": base}
    out.append({**common, "kind": "layer_sensitivity", "delta_by_k": {str(k): v["delta"] for k, v in sens.items()}})
    delta_by_k = {k: v["delta"] for k, v in sens.items()}
    plans = []
    for d in sorted({float(d) for d in densities if float(d) < 1.0}, reverse=True):
      uniform = SparsityConfig(attn_density=d, dense_layers=tuple(dense_layers)).layer_groups(cfg)
      total = sum(g if k is None else k for k in uniform)
      plans.append((f"equal-cost-{d:g}", d, plan_budget(delta_by_k, g, total_groups=total), uniform))
    for ratio in ratios:
      plans.append((f"ppl-{round(100 * (ratio - 1), 6):g}pct", None,
                    plan_budget(delta_by_k, g, max_nll=math.log(ratio)), None))
    for name, d, ks, uniform in plans:
      checked, _ = budget_nll(model, wins, ks, selector=selector, routers=routers, sparse_from=PPL_PREFIX)
      row = {**common, "kind": "budget", "name": name, "k_per_layer": ks,
             "avg_density": sum(ks) / (cfg.num_layers * g), "predicted_ppl_ratio": math.exp(checked - base)}
      if uniform is not None:
        uk = [g if k is None else k for k in uniform]
        u_nll, _ = budget_nll(model, wins, uk, selector=selector, routers=routers, sparse_from=PPL_PREFIX)
        default_k = max(set(uk[1:]), key=uk[1:].count)
        row.update(density=d, uniform_ppl_ratio=math.exp(u_nll - base),
                   per_layer=budget_spec(ks, g, default_k))
      else:
        default_k = max(set(ks[1:]), key=ks[1:].count)
        row.update(density=density_of(default_k, g), per_layer=budget_spec(ks, g, default_k))
      out.append(row)
  return out
