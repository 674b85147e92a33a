"""End-to-end router training: collect (dense model over real text) -> train -> evaluate -> calibrate -> save.

Data splits: the training text is the "train" split of `polar_jax.data` (sha1 rule); validation uses the
"heldout" split, of which only the "val" half (`heldout_part`) is used here, so the other half stays
untouched for tests and evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np

from polar_jax import paths
from polar_jax.routers.calibrate import calibrate_budgets
from polar_jax.routers.collect import CollectSettings, RouterData, collect
from polar_jax.routers.io import save_routers
from polar_jax.routers.modules import Routers, default_neuron_rank, has_neuron_mlp
from polar_jax.routers.train import (TrainSettings, head_metrics, neuron_metrics, train_head_routers,
                                     train_neuron_routers, unpack_fired)
from polar_jax.sparsity import groups_for_density

EVAL_DENSITIES = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


def heldout_part(text: str) -> str:
  """Splits held-out text in two halves: "val" (router validation) or "test" (left for evaluation)."""
  return "val" if (int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) // 10) % 2 == 0 else "test"


def eval_group_counts(num_groups: int) -> tuple[int, ...]:
  """Group counts at which validation metrics are recorded: every k < G for G <= 16, else EVAL_DENSITIES."""
  if num_groups <= 16:
    return tuple(range(1, num_groups))
  return tuple(sorted({groups_for_density(d, num_groups) for d in EVAL_DENSITIES}))


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
  """Settings of one router training run."""

  tokens: int = 200_000          # training tokens to collect
  val_tokens: int = 16_384       # held-out validation tokens
  train_density: float = 0.5     # labels: each token's top round_half_up(density * G) groups
  max_seq_len: int = 512
  batch_tokens: int = 2048       # padded tokens per collection forward pass
  neuron_rank: int | None = None
  train: TrainSettings = TrainSettings()
  seed: int = 0


def default_work_dir(fingerprint: str, data: str, settings: PipelineSettings) -> pathlib.Path:
  key = json.dumps([data, settings.tokens, settings.val_tokens, settings.max_seq_len, settings.seed])
  return paths.home() / "router_data" / f"{fingerprint}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def train_routers(model, train_sequences: Sequence[Sequence[int]], val_sequences: Sequence[Sequence[int]],
                  out_dir, *, data: str, settings: PipelineSettings = PipelineSettings(), work_dir=None,
                  keep_data: bool = False, progress: bool = True, extra_metadata: dict | None = None) -> Routers:
  """Collects router data for `model`, trains and evaluates its routers, and saves them to `out_dir`.

  Args:
    model: the dense `CausalLM`.
    train_sequences, val_sequences: token id lists (disjoint texts).
    out_dir: the router directory to write (`polar_jax.load_routers(out_dir)` reads it).
    data: a description of the text, stored in the metadata.
    work_dir: where collected data goes (resumable); default under `polar_jax.paths.home()`.
    keep_data: keep the collected data after a successful run.

  Returns:
    The trained `Routers` (also saved).
  """
  config = model.config
  fp = config.fingerprint()
  g = config.num_kv_heads
  k_train = groups_for_density(settings.train_density, g)
  if k_train >= g:
    raise ValueError(f"train_density={settings.train_density} keeps all {g} KV groups: nothing to learn; "
                     f"use a density below {(g - 0.5) / g:.3f}")
  work = pathlib.Path(work_dir) if work_dir is not None else default_work_dir(fp, data, settings)
  common = dict(fingerprint=fp, max_seq_len=settings.max_seq_len, batch_tokens=settings.batch_tokens,
                seed=settings.seed)
  train_data = RouterData(collect(model, train_sequences, work / "train",
                                  CollectSettings(data=f"{data} [train]", max_tokens=settings.tokens, **common),
                                  progress=progress))
  val_data = RouterData(collect(model, val_sequences, work / "val",
                                CollectSettings(data=f"{data} [validation]", max_tokens=settings.val_tokens,
                                                **common), progress=progress))
  L, d = config.num_layers, config.hidden_size
  head, head_summary = train_head_routers(train_data, val_data, L, d, g, k_train, settings.train,
                                          progress=progress)
  ks = eval_group_counts(g)
  hm = head_metrics(head, val_data, k_train, ks)
  validation: dict[str, Any] = {"tokens": hm["tokens"], "label_groups": k_train, "head": [
      {"groups": k, "density": k / g, "chance_recall": k / g,
       "recall_mean": float(np.mean(hm[k]["recall"])), "precision_mean": float(np.mean(hm[k]["precision"])),
       "recall": _rounded(hm[k]["recall"]), "precision": _rounded(hm[k]["precision"])} for k in ks]}
  training = {"head": head_summary}
  neuron, table = None, {}
  if has_neuron_mlp(config):
    rank = settings.neuron_rank or default_neuron_rank(d)
    neuron, neuron_summary = train_neuron_routers(train_data, val_data, L, d, config.intermediate_size, rank,
                                                  settings.train, progress=progress)
    nm = neuron_metrics(neuron, val_data)
    validation["neuron"] = {"recall": _rounded(nm["recall"]), "precision": _rounded(nm["precision"]),
                            "firing_rate": _rounded(nm["firing_rate"]),
                            "recall_mean": float(np.mean(nm["recall"]))}
    arrs = val_data.all(("x", "fired"))
    table, stats = calibrate_budgets(neuron, arrs["x"], unpack_fired(arrs["fired"], config.intermediate_size),
                                     seed=settings.seed)
    validation["neuron_budgets"] = {str(b): {"k": list(table[b]), "mean_union": _rounded(s["union"]),
                                             "recall": _rounded(s["recall"])} for b, s in stats.items()}
    training["neuron"] = neuron_summary
  routers = Routers(head, neuron, fp, table)
  metadata = {
      "kind": "polar_jax routers",
      "model": config.to_dict(),
      "data": {"description": data, "train_tokens": train_data.tokens, "validation_tokens": val_data.tokens,
               "max_seq_len": settings.max_seq_len, "seed": settings.seed},
      "train_density": settings.train_density,
      "train_groups": k_train,
      "num_groups": g,
      "settings": {**dataclasses.asdict(settings), "train": dataclasses.asdict(settings.train)},
      "training": training,
      "validation": validation,
      **(extra_metadata or {}),
  }
  save_routers(routers, out_dir, metadata)
  if not keep_data:
    shutil.rmtree(work, ignore_errors=True)
  return routers


def _rounded(a) -> list[float]:
  return [round(float(v), 5) for v in np.asarray(a).ravel()]
