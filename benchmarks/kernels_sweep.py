"""Tuning sweep for the Pallas kernels (run through `kernels.py --sweep PATH`).

Times hand-picked configs around the heuristics at the anchor shapes and writes
one JSON line per config (op "<op>_sweep", plus "config"); prints the best first.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import AttentionConfig
from pallas_kernels import GatherConfig
from pallas_kernels import gather_matmul_cols
from pallas_kernels import gather_matmul_rows
from pallas_kernels import selective_decode_attention
from pallas_kernels import _platform
from pallas_kernels import decode_attention_triton
from pallas_kernels import gather_matmul_triton

A = AttentionConfig
# (B, S, Hq, Hkv, K): configs as (block_k, num_splits, num_warps, num_stages).
ATTENTION_SWEEP = {
    # The decode step's shapes (LLaMA-2-7B B32/B16 prompt ~2000 at density 0.5 and dense, Llama-3.1-8B
    # B32 prompt 4000 at 0.625): num_splits 1 = the direct kernel (no merge/normalise/scatter after it) against
    # the split-K kernel and its XLA epilogue, and the direct kernel's pipeline depth. Earlier sweeps' shapes and
    # results: results/kernels_sweep.jsonl.
    (32, 2048, 32, 32, 16): [(64, 1, 4, 4), (64, 3, 4, 3), (64, 2, 4, 3), (32, 1, 4, 3), (64, 1, 2, 3)],
    (16, 2048, 32, 32, 16): [(64, 1, 4, 4), (32, 1, 4, 4), (64, 5, 4, 3), (32, 1, 4, 3)],
    (32, 2048, 32, 32, 32): [(64, 1, 4, 4), (64, 2, 4, 3)],
    (32, 4096, 32, 8, 5): [(64, 1, 4, 4), (64, 7, 4, 3), (64, 2, 4, 3)],
}
# (block_n, block_k, splits_factor, warps, stages); splits = heuristic splits for
# that (block_n, block_k) times splits_factor.
COLS_SWEEP = [(64, 64, 1, 4, 4), (32, 256, 1, 4, 3), (64, 128, 2, 4, 3),
              (64, 256, 1, 4, 3), (64, 128, 1, 4, 4)]
ROWS_SWEEP = [(128, 128, 1, 4, 3), (64, 64, 1, 4, 3), (64, 128, 2, 4, 3),
              (128, 32, 1, 4, 4), (64, 128, 1, 4, 4)]
MLP_SHAPES = [(1, 0.25), (32, 0.25), (128, 0.25), (32, 1.0)]
D_MODEL, N_NEURONS = 4096, 16384


def _sweep_attention(timer, base, finish):
  from kernels import _copies  # pylint: disable=import-outside-toplevel
  records = []
  for (B, S, Hq, Hkv, K), configs in ATTENTION_SWEEP.items():
    D, dtype = 128, jnp.bfloat16
    sel_bytes = 2 * B * K * S * D * 2
    rng = np.random.default_rng(0)
    gidx = jnp.asarray(np.stack([rng.permutation(Hkv)[:K] for _ in range(B)]),
                       jnp.int32)
    lengths = jnp.full((B,), S, jnp.int32)
    sets = []
    for r in range(_copies(sel_bytes)):
      ks = jax.random.split(jax.random.key(r), 3)
      sets.append((jax.random.normal(ks[0], (B, Hq, D), dtype),
                   jax.random.normal(ks[1], (B, Hkv, S, D), dtype),
                   jax.random.normal(ks[2], (B, Hkv, S, D), dtype)))
    heur = decode_attention_triton.choose_config(B, K, S, D, 2)
    for cfg in [heur] + [A(*c) for c in configs]:
      fn = lambda q, k, v, cfg=cfg: selective_decode_attention(
          q, k, v, lengths, gidx, implementation="pallas", config=cfg)
      records.append(_record(timer, fn, sets, base, finish, cfg, cfg is heur,
                             op="attention_sweep", B=B, S=S, Hq=Hq, Hkv=Hkv,
                             D=D, density=K / Hkv, bytes=sel_bytes))
    del sets
    _print_best(records[-len(configs) - 1:])
  return records


def _sweep_mlp(timer, base, finish):
  from kernels import _copies  # pylint: disable=import-outside-toplevel
  records = []
  d, N, dtype = D_MODEL, N_NEURONS, jnp.bfloat16
  for M, density in MLP_SHAPES:
    k = round(density * N)
    sel_bytes = k * d * 2
    idx = jnp.asarray(np.random.default_rng(k).permutation(N)[:k], jnp.int32)
    sets = []
    for r in range(_copies(sel_bytes)):
      ks = jax.random.split(jax.random.key(r), 3)
      sets.append((jax.random.normal(ks[0], (M, d), dtype),
                   jax.random.normal(ks[1], (N, d), dtype) * 0.02,
                   jax.random.normal(ks[2], (M, k), dtype)))
    for op, table, choose in (
        ("cols", COLS_SWEEP, gather_matmul_triton.choose_cols_config),
        ("rows", ROWS_SWEEP, gather_matmul_triton.choose_rows_config)):
      heur = choose(M, d, k, 2)
      configs = [heur]
      for bn, bk, factor, warps, stages in table:
        out_blocks = _platform.cdiv(k if op == "cols" else d, bn)
        red_blocks = _platform.cdiv(d if op == "cols" else k, bk)
        base_programs = _platform.cdiv(M, heur.block_m) * out_blocks
        ns = gather_matmul_triton.min_splits(base_programs, red_blocks,
                                             _platform.num_sms())
        ns = max(1, min(int(ns * factor), red_blocks))
        configs.append(GatherConfig(heur.block_m, bn, bk, ns, warps, stages))
      for cfg in configs:
        if op == "cols":
          fn = lambda x, w, h, cfg=cfg: gather_matmul_cols(
              x, w, idx, None, "relu", implementation="pallas", config=cfg)
        else:
          fn = lambda x, w, h, cfg=cfg: gather_matmul_rows(
              h, w, idx, implementation="pallas", config=cfg)
        records.append(_record(timer, fn, sets, base, finish, cfg, cfg is heur,
                               op=f"{op}_sweep", M=M, d=d, N=N,
                               density=density, bytes=sel_bytes))
      _print_best(records[-len(configs):])
    del sets
  return records


def _record(timer, fn, sets, base, finish, cfg, is_heuristic, **fields):
  try:
    ms, wall, how, _ = timer(fn, sets)
  except Exception as e:  # pylint: disable=broad-except
    print(f"  config {cfg} failed: {type(e).__name__}: {str(e)[:200]}")
    ms, wall, how = float("inf"), float("inf"), "failed"
  rec = dict(base, impl="pallas", dtype="bfloat16", ms=ms, ms_wall=wall,
             timer=how, config=dataclasses.asdict(cfg), heuristic=is_heuristic,
             **fields)
  return finish(rec)


def _print_best(records):
  r0 = records[0]
  shape = {k: r0.get(k) for k in ("op", "B", "S", "Hq", "Hkv", "M", "density")}
  print(shape)
  for r in sorted(records, key=lambda r: r["ms"]):
    mark = "*" if r["heuristic"] else " "
    print(f" {mark} {r['ms']:8.4f} ms {r['roofline_frac']:5.2f} {r['config']}")


def run(timer, base, only, path, finish):
  records = []
  if only in ("attn", "all"):
    records += _sweep_attention(timer, base, finish)
  if only in ("mlp", "all"):
    records += _sweep_mlp(timer, base, finish)
  with open(path, "a", encoding="utf-8") as f:
    for rec in records:
      f.write(json.dumps(rec) + "\n")
