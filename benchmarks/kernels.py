"""Kernel benchmark: selective decode attention, the gathered MLP, the union top-k and the decode projections vs XLA.

Sweeps the shapes of shared/anchors.md, measures the device copy bandwidth in the
same run and appends one JSON line per measurement to --out:
  device, jax, date, commit, op, impl, B, S, Hq, Hkv, D, M, d, N, density, dtype,
  ms, ms_wall, timer, bytes, tbps, copy_tbps, roofline_frac (+ config, max_rel_err)
`bytes` is what must be read (selected K+V, or selected rows of both MLP weights);
`ms` is the CUPTI kernel time when available (timer="cupti"), else the wall-clock
median around block_until_ready (timer="wall"). Inputs are rotated over several
copies when the selected bytes would fit in L2.

  python3 benchmarks/kernels.py --out $OUT/kernels.jsonl          # on the GPU
  python3 benchmarks/kernels.py --sweep $OUT/sweep.jsonl --only attn   # tuning
  python3 benchmarks/kernels.py --only matmul [--families narrow] --out $OUT/k.jsonl   # skinny_matmul vs XLA
  python3 benchmarks/kernels.py --only paged [--families mha|gqa] --out $OUT/k.jsonl   # paged vs contiguous
  python3 benchmarks/kernels.py --only attn --kv-dtype bfloat16 int8 float8_e4m3fn --out $OUT/k.jsonl  # 8-bit KV
  python benchmarks/kernels.py --smoke --out /tmp/k.jsonl          # CPU, interpret
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
from benchmarks import common  # noqa: E402
from pallas_kernels import gather_matmul_cols  # noqa: E402
from pallas_kernels import kv_quant  # noqa: E402
from pallas_kernels import gather_matmul_rows  # noqa: E402
from pallas_kernels import gather_matmul_triton  # noqa: E402
from pallas_kernels import selective_decode_attention  # noqa: E402
from pallas_kernels import skinny_matmul_triton  # noqa: E402
from pallas_kernels.skinny_matmul import skinny_matmul  # noqa: E402
from pallas_kernels import AttentionHeuristics  # noqa: E402
from pallas_kernels.decode_attention_triton import choose_config as attn_config  # noqa: E402
from pallas_kernels import topk_select  # noqa: E402
from pallas_kernels.decode_attention_xla import decode_attention_xla  # noqa: E402
from pallas_kernels.decode_attention_xla import decode_attention_xla_gather  # noqa: E402
from pallas_kernels import paged_decode_attention_triton as paged_triton  # noqa: E402
from pallas_kernels.paged_decode_attention import selective_paged_decode_attention  # noqa: E402

KEYS = ("device", "jax", "date", "commit", "op", "impl", "B", "S", "Hq", "Hkv",
        "D", "M", "d", "N", "density", "dtype", "ms", "ms_wall", "timer",
        "bytes", "tbps", "copy_tbps", "roofline_frac")
ROTATE_BYTES = 256 << 20  # > 5x the H100's 50 MB L2


@dataclasses.dataclass
class Timer:
  iters: int
  cupti: bool
  warmup: int = 3

  def __call__(self, fn, arg_sets):
    """Per-call ms of fn over the rotated arg_sets.

    Returns (ms, ms_wall, timer name, fn(*arg_sets[0])).
    """
    multi = jax.jit(lambda sets: [fn(*a) for a in sets])
    first = jax.block_until_ready(multi(arg_sets))[0]
    for _ in range(self.warmup):
      jax.block_until_ready(multi(arg_sets))
    walls = []
    for _ in range(self.iters):
      t0 = time.perf_counter()
      jax.block_until_ready(multi(arg_sets))
      walls.append((time.perf_counter() - t0) * 1e3 / len(arg_sets))
    wall = statistics.median(walls)
    if self.cupti:
      try:
        from jax.experimental.mosaic.gpu import profiler
        _, times = profiler.measure(multi, iterations=self.iters)(arg_sets)
        return statistics.median(times) / len(arg_sets), wall, "cupti", first
      except Exception as e:  # pylint: disable=broad-except
        print(f"CUPTI timing unavailable ({type(e).__name__}: {e}); wall clock")
        self.cupti = False
    return wall, wall, "wall", first


def copy_bandwidth(timer, nbytes):
  """TB/s of a device copy (bytes read + bytes written)."""
  x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.bfloat16)
  ms, _, _, _ = timer(lambda a: -a, [(x,)])
  return 2 * nbytes / (ms * 1e-3) / 1e12


def _copies(nbytes_selected):
  return max(1, min(8, math.ceil(ROTATE_BYTES / max(nbytes_selected, 1))))


def _rel_err(out, ref):
  out = np.asarray(out.astype(jnp.float32), np.float64)
  ref = np.asarray(ref.astype(jnp.float32), np.float64)
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def attention_cases(smoke):
  if smoke:
    return [(2, 64, 8, 2, 64, (1.0, 0.5))]
  cases = []
  for hq, hkv, dens in ((32, 32, (1.0, 0.625, 0.5, 0.25)),
                        (32, 8, (1.0, 0.625, 0.5, 0.25))):
    for b in (16, 64):
      for s in (1024, 4096):
        cases.append((b, s, hq, hkv, 128, dens))
  return cases


def mlp_cases(smoke):
  if smoke:
    return 64, 256, (3,), (0.25, 1.0)
  return 4096, 16384, (1, 8, 32, 128), (0.1, 0.25, 0.5, 1.0)


def bench_attention(timer, base, smoke, check, dtype=jnp.bfloat16, kv_dtypes=(None,)):
  """The attention cases at each KV storage (`kv_dtypes`: None for `dtype`, or an 8-bit dtype name: K/V quantised
  with per-token scales; `bytes` then counts the values and the float32 scales), one record at a time."""
  for (B, S, Hq, Hkv, D, densities), kv_dtype in ((c, kv) for c in attention_cases(smoke) for kv in kv_dtypes):
    quantised = kv_dtype is not None and kv_quant.is_8bit(kv_dtype)
    bytes_per_vector = D * 1 + 4 if quantised else D * jnp.dtype(dtype).itemsize
    for density in densities:
      K = max(1, round(density * Hkv))
      sel_bytes = 2 * B * K * S * bytes_per_vector
      rng = np.random.default_rng(B + S + K)
      gidx = jnp.asarray(np.stack([rng.permutation(Hkv)[:K] for _ in range(B)]),
                         jnp.int32)
      lengths = jnp.full((B,), S, jnp.int32)
      sets = []
      for r in range(_copies(sel_bytes)):
        kq, kk, kv = jax.random.split(jax.random.key(r), 3)
        q, k, v = (jax.random.normal(kq, (B, Hq, D), dtype), jax.random.normal(kk, (B, Hkv, S, D), dtype),
                   jax.random.normal(kv, (B, Hkv, S, D), dtype))
        if quantised:   # (values, scale) pairs: the 8-bit cache as the decode step holds it
          k, v = kv_quant.quantise(k, kv_dtype), kv_quant.quantise(v, kv_dtype)
        sets.append((q, k, v))
        del q, k, v
      attend = lambda q, k, v, impl: selective_decode_attention(  # noqa: E731
          q, *((k[0], v[0]) if quantised else (k, v)), lengths, gidx, implementation=impl,
          **(dict(k_scale=k[1], v_scale=v[1]) if quantised else {}))
      impls = {"pallas": lambda q, k, v: attend(q, k, v, "pallas")}
      if density == 1.0:
        impls["xla_einsum"] = lambda q, k, v: attend(q, k, v, "xla")
      elif not quantised:
        impls["xla_gather"] = lambda q, k, v: decode_attention_xla_gather(
            q, k, v, lengths, gidx, None, scale=D ** -0.5)
      for impl, fn in impls.items():
        ms, wall, how, out = timer(fn, sets)
        rec = dict(base, op="attention", impl=impl, B=B, S=S, Hq=Hq, Hkv=Hkv,
                   D=D, density=density, dtype=jnp.dtype(dtype).name, ms=ms,
                   ms_wall=wall, timer=how, bytes=sel_bytes,
                   kv_dtype=kv_dtype if quantised else jnp.dtype(dtype).name)
        if check and impl == "pallas":
          ref = attend(*sets[0], "xla")
          rec["max_rel_err"] = _rel_err(out, ref)
        yield _finish(rec)
      del sets


# The persistent-kernel probe's variants: the direct kernel (one program per (row, group), its heuristic stages),
# the persistent kernel as `choose_config` sets it, and at other pipeline depths / programs per SM / key blocks.
PERSISTENT_VARIANTS = (dict(persistent=False), dict(persistent=True),
                       dict(persistent=True, num_stages=4, programs_per_sm=1),
                       dict(persistent=True, num_stages=6, programs_per_sm=1),
                       dict(persistent=True, block_k=32, num_stages=4, programs_per_sm=2))


def probe_cases(smoke):
  """(family, B, S, K or None (dense), selection, config overrides[, Hkv]) for `bench_attention_probe`; Hq 32
  (4 in the smoke run), Hkv = Hq unless given."""
  if smoke:
    return [("selection", 2, 64, None, "dense", {}), ("selection", 2, 64, 2, "random", {}),
            ("selection", 2, 64, 2, "first", {}), ("config", 2, 64, 2, "random", dict(block_k=16, num_stages=2)),
            ("splits", 2, 64, 2, "random", dict(num_splits=2)),
            ("persistent", 2, 64, 2, "random", dict(persistent=True, block_k=16, num_stages=2)),
            ("persistent", 2, 64, 1, "random", dict(persistent=True, block_k=16, num_stages=2), 2)]
  cases = [("selection", 32, 2048, k, sel, {}) for k, sel in ((None, "dense"), (32, "random"), (16, "random"),
                                                             (16, "first"), (16, "even"))]
  cases += [("length", 32, s, k, "dense" if k is None else "random", {}) for s in (1024, 4096) for k in (None, 16)]
  cases += [("config", b, 2048, 16, "random", dict(block_k=bk, num_stages=st, num_warps=nw))
            for b in (32, 16) for bk in (32, 64, 128) for st in (3, 4) for nw in (4, 8)]
  shapes = [(2048, b, k) for b, k in ((32, 16), (16, 16), (16, 8), (32, 4), (8, 16), (8, 8), (4, 16), (16, 4),
                                      (1, 16), (1, 32))] + [(4096, 16, 8), (4096, 8, 16), (4096, 1, 16)]
  cases += [("splits", b, s, k, "random", dict(num_splits=ns)) for s, b, k in shapes for ns in (1, 2, 3, 4, 6, 8)]
  # Persistent vs direct where the heuristic does not split keys (>= 1 selected program per SM); GQA (Hkv 8):
  # Llama-3.1-8B at density 0.625 (K 5) and dense.
  shapes = [(32, 2048, 16, 32), (32, 1024, 16, 32), (32, 4096, 16, 32), (32, 2048, None, 32), (16, 2048, 16, 32),
            (64, 2048, 16, 32), (16, 2048, 12, 32), (32, 4096, 5, 8), (32, 4096, None, 8), (64, 2048, 5, 8)]
  cases += [("persistent", b, s, k, "dense" if k is None else "random", dict(v), hkv)
            for b, s, k, hkv in shapes for v in PERSISTENT_VARIANTS]
  return cases


def bench_attention_probe(timer, base, smoke, dtype=jnp.bfloat16, families=None):
  """Where the direct kernel's time goes, at the decode step's shapes (LLaMA-2-7B layer: Hq = Hkv = 32, D 128,
  rows of S - 7 cached keys; bytes = the selected K+V): `selection` runs one kernel with selections that differ
  only in the index path (all 32 groups named vs None), in locality (random / first K / every other group);
  `length` scales S (the fixed cost per call is the intercept); `config` varies block_k, stages and warps;
  `splits` times 1-8 key splits (1: the direct kernel; else split-K + XLA merge) below and above one selected
  program per SM; `persistent` times the persistent kernel's variants against the direct kernel. Records: op
  "attention_probe", `family`, `selection`, `config` (the one run), `heuristic`
  (whether it is `choose_config`'s)."""
  records = []
  Hq = 4 if smoke else 32
  D = 32 if smoke else 128
  itemsize = jnp.dtype(dtype).itemsize
  for family, B, S, K, selection, overrides, *hkv in probe_cases(smoke):
    if families and family not in families:
      continue
    Hkv = hkv[0] if hkv else Hq
    length = S - 7
    rng = np.random.default_rng(B * S + (K or 0))
    if selection == "dense":
      gidx = None
    elif selection == "random":
      gidx = np.stack([rng.permutation(Hkv)[:K] for _ in range(B)])
    elif selection == "first":
      gidx = np.tile(np.arange(K), (B, 1))
    else:                                                    # "even": every other group
      gidx = np.tile(np.arange(0, 2 * K, 2), (B, 1))
    gidx = None if gidx is None else jnp.asarray(gidx, jnp.int32)
    k_sel = Hkv if K is None else K
    rules = AttentionHeuristics(persistent=overrides.get("persistent", AttentionHeuristics().persistent))
    heur = attn_config(B, k_sel, S, D, itemsize, heuristics=rules)
    cfg = dataclasses.replace(heur, **overrides)
    if "num_stages" not in overrides and cfg.num_splits != heur.num_splits:
      cfg = dataclasses.replace(cfg, num_stages=3)     # off the heuristic's split count: the 3-stage default
    sel_bytes = 2 * B * k_sel * length * D * itemsize
    lengths = jnp.full((B,), length, jnp.int32)
    sets = []
    for r in range(_copies(sel_bytes)):
      kq, kk, kv = jax.random.split(jax.random.key(r), 3)
      sets.append((jax.random.normal(kq, (B, Hq, D), dtype), jax.random.normal(kk, (B, Hkv, S, D), dtype),
                   jax.random.normal(kv, (B, Hkv, S, D), dtype)))
    fn = lambda q, k, v, cfg=cfg, gidx=gidx: selective_decode_attention(  # noqa: E731
        q, k, v, lengths, gidx, implementation="pallas", config=cfg)
    ms, wall, how, out = timer(fn, sets)
    ref = selective_decode_attention(*sets[0], lengths, gidx, implementation="xla")
    records.append(_finish(dict(
        base, op="attention_probe", impl="pallas", family=family, selection=selection, B=B, S=S, Hq=Hq, Hkv=Hkv,
        D=D, K=k_sel, density=k_sel / Hkv, dtype=jnp.dtype(dtype).name, ms=ms, ms_wall=wall, timer=how,
        bytes=sel_bytes, config=dataclasses.asdict(cfg), heuristic=cfg == heur, max_rel_err=_rel_err(out, ref))))
    del sets
  return records


def paged_cases(smoke, families=None):
  """(family, B, S, Hq, Hkv, D, densities, page sizes) for `bench_paged_attention`: LLaMA-2-7B's layer (MHA, 32
  heads of 128) and a GQA 32/8 layer at B32/B64 and S 2048/4096."""
  if smoke:
    return [("smoke", 2, 64, 4, 2, 32, (0.5,), (16,))]
  cases = []
  for family, hq, hkv in (("mha", 32, 32), ("gqa", 32, 8)):
    if families and family not in families:
      continue
    cases += [(family, b, s, hq, hkv, 128, (1.0, 0.5, 0.25), (16, 32)) for b in (32, 64) for s in (2048, 4096)]
  return cases


def _paged_pool(cache_bhsd, page_size, perm):
  """The cache `[B, Hkv, S, D]` as a page pool `[Hkv, B * S / page_size, page_size, D]` whose pages sit in the
  order `perm` (pool page j holds contiguous page perm[j], contiguous page i = row i // (S / page_size))."""
  B, Hkv, S, D = cache_bhsd.shape
  pool = cache_bhsd.transpose(1, 0, 2, 3).reshape(Hkv, B * S // page_size, page_size, D)
  return pool[:, perm]


def bench_paged_attention(timer, base, smoke, sink, dtype=jnp.bfloat16, families=None):
  """Paged vs contiguous selective decode attention on the same keys (every row S long, its pages shuffled over
  the pool): the contiguous kernel at its heuristic config, the paged kernel at its heuristic config and with one
  whole page per block (`block_k = page_size`), each at its heuristic pipeline depth and at 4 stages, for each page
  size (the smoke run: both blocks at the heuristic depth). bytes = the selected K+V. Records: op
  "paged_attention", impl "contiguous" / "paged", `K`, `page_size` (None: contiguous), `config`, `heuristic`,
  `max_rel_err` vs the contiguous XLA reference."""
  records = []
  itemsize = jnp.dtype(dtype).itemsize
  for family, B, S, Hq, Hkv, D, densities, page_sizes in paged_cases(smoke, families):
    lengths = jnp.full((B,), S, jnp.int32)
    for density in densities:
      K = max(1, round(density * Hkv))
      sel_bytes = 2 * B * K * S * D * itemsize
      rng = np.random.default_rng(B + S + K)
      gidx = jnp.asarray(np.stack([rng.permutation(Hkv)[:K] for _ in range(B)]), jnp.int32)
      sets = []
      for r in range(_copies(sel_bytes)):
        kq, kk, kv = jax.random.split(jax.random.key(r), 3)
        sets.append((jax.random.normal(kq, (B, Hq, D), dtype), jax.random.normal(kk, (B, Hkv, S, D), dtype),
                     jax.random.normal(kv, (B, Hkv, S, D), dtype)))
      ref = jax.jit(decode_attention_xla, static_argnames=("scale",))(*sets[0], lengths, gidx, None,
                                                                       scale=D ** -0.5)
      common_rec = dict(base, op="paged_attention", family=family, B=B, S=S, Hq=Hq, Hkv=Hkv, D=D, K=K,
                        density=K / Hkv, dtype=jnp.dtype(dtype).name, bytes=sel_bytes)
      runs = [(None, None, lambda q, k, v: selective_decode_attention(q, k, v, lengths, gidx,
                                                                      implementation="pallas"), sets)]
      for page_size in page_sizes:
        pages_per_row = S // page_size
        perm = rng.permutation(B * pages_per_row)
        table = jnp.asarray(np.argsort(perm).reshape(B, pages_per_row), jnp.int32)
        perm = jnp.asarray(perm)
        paged_sets = [(q, _paged_pool(k, page_size, perm), _paged_pool(v, page_size, perm)) for q, k, v in sets]
        heur = paged_triton.choose_config(B, K, page_size, S)
        variants = (heur, dataclasses.replace(heur, num_stages=4), dataclasses.replace(heur, block_k=page_size),
                    dataclasses.replace(heur, block_k=page_size, num_stages=4))
        for cfg in dict.fromkeys(variants[::2] if smoke else variants):
          fn = lambda q, kp, vp, cfg=cfg, table=table: selective_paged_decode_attention(  # noqa: E731
              q, kp, vp, lengths, table, gidx, implementation="pallas", config=cfg)
          runs.append((page_size, cfg, fn, paged_sets))
      for page_size, cfg, fn, arg_sets in runs:
        impl = "contiguous" if page_size is None else "paged"
        try:
          ms, wall, how, out = timer(fn, arg_sets)
        except Exception as e:  # pylint: disable=broad-except  (e.g. a variant's pipeline exceeds shared memory)
          print(f"paged_attention {family} B{B} S{S} K{K} {impl} {page_size} {cfg}: failed "
                f"({type(e).__name__}: {str(e)[:120]})", flush=True)
          continue
        rec = _finish(dict(common_rec, impl=impl, page_size=page_size, ms=ms, ms_wall=wall, timer=how,
                           config=None if cfg is None else dataclasses.asdict(cfg),
                           heuristic=cfg is None or cfg == paged_triton.choose_config(B, K, page_size, S),
                           max_rel_err=_rel_err(out, ref)))
        sink(rec)
        records.append(rec)
        print(f"paged_attention {family} B{B:3} S{S:5} K{K:2} {impl:10} page {page_size or '-':>3} "
              f"block_k {cfg.block_k if cfg else '-':>3} splits {cfg.num_splits if cfg else '-'}: "
              f"{ms * 1e3:7.1f} us {rec['tbps']:.2f} TB/s ({rec['roofline_frac']:.2f} of copy) "
              f"err {rec['max_rel_err']:.1e}", flush=True)
      del sets, runs
  return records


# The decode step's projections (`--only matmul`): (name, K, N, residual, out dtype) of LLaMA-2-7B (fused q|k|v,
# o, fused gate|up, down) and Llama-3.1-8B (GQA q|k|v, gate|up, down).
MATMUL_SHAPES = (("llama2.qkv", 4096, 12288, False, "bfloat16"), ("llama2.o", 4096, 4096, True, "bfloat16"),
                 ("llama2.gate_up", 4096, 22016, False, "float32"), ("llama2.down", 11008, 4096, True, "bfloat16"),
                 ("llama3.qkv", 4096, 6144, False, "bfloat16"), ("llama3.gate_up", 4096, 28672, False, "float32"),
                 ("llama3.down", 14336, 4096, True, "bfloat16"))
# Config overrides timed next to the heuristic: (block_n, block_k, num_splits, num_stages, num_warps).
MATMUL_VARIANTS = tuple((bn, bk, 1, st, 4) for bn in (64, 128, 256) for bk, st in (
    (64, 4), (64, 6), (128, 3), (128, 4), (128, 5))) + ((128, 128, 1, 4, 8), (256, 64, 1, 4, 8),
                                                      (64, 128, 2, 4, 4), (128, 128, 2, 4, 4), (128, 64, 2, 6, 4))


# `--families narrow`: the grids for projections too narrow to fill the SMs with column tiles (o, down: N 4096),
# and gate|up at M 16: (block_n, block_k, num_splits, num_stages, num_warps).
MATMUL_NARROW_VARIANTS = tuple((bn, bk, ns, st, 4) for bn in (32, 64, 128) for ns in (1, 2, 3, 4)
                               for bk, st in ((128, 4), (64, 6))) + ((64, 128, 2, 4, 8), (64, 128, 2, 3, 4),
                                                                    (32, 256, 2, 3, 4), (64, 64, 4, 4, 4))
MATMUL_WIDE_VARIANTS = ((256, 64, 1, 3, 4), (256, 64, 1, 5, 4), (256, 32, 1, 6, 4), (256, 64, 1, 4, 8),
                        (128, 64, 1, 4, 4), (128, 64, 1, 6, 4), (128, 128, 1, 3, 4))


# `--families opt`: OPT-6.7B's dense ReLU MLP (`NeuronMLP.decode`): fc1 from its [N, d] rows (w_layout "nk") with
# bias + ReLU, fc2 with bias + residual. (name, K, N, residual, out dtype, w_layout, relu); both have a bias.
OPT_MLP_SHAPES = (("opt.fc1", 4096, 16384, False, "bfloat16", "nk", True),
                  ("opt.fc2", 16384, 4096, True, "bfloat16", "kn", False))
OPT_MLP_VARIANTS = ((128, 64, 1, 6, 4), (128, 128, 1, 3, 4), (256, 64, 1, 4, 4), (64, 128, 1, 4, 4),
                    (128, 128, 2, 4, 4), (64, 128, 2, 4, 4), (64, 64, 4, 4, 4), (32, 128, 4, 4, 4))


def matmul_cases(smoke, families=None):
  """(shape name, M, K, N, residual, out dtype, overrides or None (the heuristic), "pallas" or "xla"), then
  optionally w_layout and relu (bias too): the `--families opt` cases."""
  if smoke:
    return [("smoke", 3, 200, 96, True, "bfloat16", None, "xla"), ("smoke", 3, 200, 96, True, "bfloat16", None,
                                                                       "pallas"),
            ("smoke", 3, 200, 96, True, "bfloat16", (32, 64, 2, 2, 4), "pallas"),
            ("smoke.nk", 3, 200, 96, False, "bfloat16", None, "pallas", "nk", True),
            ("smoke.nk", 3, 200, 96, False, "bfloat16", None, "xla", "nk", True)]
  if families and "opt" in families:
    cases = []
    for name, k, n, res, out, layout, relu in OPT_MLP_SHAPES:
      for m in (32, 64):
        cases += [(name, m, k, n, res, out, v, impl, layout, relu)
                  for v, impl in ((None, "xla"), (None, "pallas"), *((v, "pallas") for v in OPT_MLP_VARIANTS))]
    return cases
  if families and "narrow" in families:
    cases = []
    for name, k, n, res, out in MATMUL_SHAPES:
      variants = MATMUL_NARROW_VARIANTS if n == 4096 else MATMUL_WIDE_VARIANTS if "gate_up" in name else ()
      for m in (16, 32) if variants else ():
        cases += [(name, m, k, n, res, out, None, "xla"), (name, m, k, n, res, out, None, "pallas")]
        cases += [(name, m, k, n, res, out, v, "pallas") for v in variants]
    return cases
  cases = []
  for name, k, n, res, out in MATMUL_SHAPES:
    for m in (32, 16):
      full = m == 32 and name.startswith("llama2")
      variants = MATMUL_VARIANTS if full else [v for v in MATMUL_VARIANTS if v[0] in (64, 128) and v[4] == 4
                                                and v[1:4] in ((128, 1, 4), (64, 1, 6), (128, 2, 4))]
      cases += [(name, m, k, n, res, out, None, "xla"), (name, m, k, n, res, out, None, "pallas")]
      cases += [(name, m, k, n, res, out, v, "pallas") for v in variants]
  return cases


def bench_matmul(timer, base, smoke, sink, dtype=jnp.bfloat16, families=None):
  """The decode projections: `skinny_matmul` (heuristic and MATMUL_VARIANTS configs) vs XLA's dot (+ the
  residual add, whose fusion also sums XLA's split-K partials). bytes = weight + x + output (+ residual).
  Records: op "skinny_matmul", `shape`, `M`, `d` (= K), `N`, `config`, `heuristic`, `max_rel_err` vs XLA."""
  records = []
  itemsize = jnp.dtype(dtype).itemsize
  for name, m, k, n, res, out, variant, impl, *extra in matmul_cases(smoke, families):
    layout, relu = extra or ("kn", False)
    out_dtype = jnp.dtype(out)
    heur = skinny_matmul_triton.choose_config(m, k, n, itemsize)
    cfg = heur if variant is None else dataclasses.replace(
        heur, block_n=variant[0], block_k=variant[1], num_splits=variant[2], num_stages=variant[3],
        num_warps=variant[4])
    nbytes = (k * n + m * k) * itemsize + m * n * out_dtype.itemsize * (2 if res else 1)
    sets = []
    for r in range(_copies(k * n * itemsize)):
      kx, kw, kr = jax.random.split(jax.random.key(r), 3)
      w_shape = (n, k) if layout == "nk" else (k, n)
      sets.append((jax.random.normal(kx, (m, k), dtype), jax.random.normal(kw, w_shape, dtype) * k ** -0.5,
                   jax.random.normal(kr, (m, n), out_dtype) if res else None))
    bias = jax.random.normal(jax.random.key(99), (n,), dtype) * 0.1 if extra else None   # (OPT: fc1 / fc2 biases)
    kw = dict(w_layout=layout, activation="relu" if relu else None)
    fn = lambda x, w, r, cfg=cfg, impl=impl, out_dtype=out_dtype, kw=kw: skinny_matmul(  # noqa: E731
        x, w, bias, r, out_dtype=out_dtype, implementation=impl, config=cfg if impl == "pallas" else None, **kw).y
    try:
      ms, wall, how, y = timer(fn, sets)
    except Exception as e:  # pylint: disable=broad-except  (e.g. a variant's pipeline exceeds shared memory)
      print(f"{name:15} M{m:3} {impl:6} {variant}: failed ({type(e).__name__}: {str(e)[:120]})", flush=True)
      continue
    ref = skinny_matmul(*sets[0][:2], bias, sets[0][2], out_dtype=out_dtype, implementation="xla", **kw).y
    rec = _finish(dict(base, op="skinny_matmul", impl=impl, shape=name, M=m, d=k, N=n, density=1.0,
                       dtype=jnp.dtype(dtype).name, out_dtype=out, residual=res, w_layout=layout, relu=relu,
                       bias=bias is not None, ms=ms, ms_wall=wall, timer=how,
                       bytes=nbytes, config=dataclasses.asdict(cfg) if impl == "pallas" else None,
                       heuristic=impl == "pallas" and cfg == heur, max_rel_err=_rel_err(y, ref)))
    sink(rec)
    records.append(rec)
    print(f"{name:15} M{m:3} {impl:6} {'' if impl == 'xla' else variant or 'heuristic'}: {ms * 1e3:7.1f} us "
          f"{rec['tbps']:.2f} TB/s err {rec['max_rel_err']:.1e}", flush=True)
    del sets
  return records


# Config variants timed next to the heuristic (--mlp-variants): name ->
# (cols config, rows config) as functions of the heuristic's, on the shapes
# (M, density) of MLP_VARIANT_SHAPES. They probe the heuristic's two main
# choices: the split count and the pipeline depth.
MLP_VARIANTS = {
    "splits_x2": (lambda c: dataclasses.replace(c, num_splits=2 * c.num_splits),
                  lambda c: dataclasses.replace(c, num_splits=2 * c.num_splits)),
    "stages_3": (lambda c: dataclasses.replace(c, num_stages=3),
                 lambda c: dataclasses.replace(c, num_stages=3)),
}
MLP_VARIANT_SHAPES = ((1, 0.1), (32, 0.25), (32, 0.5), (128, 0.5))


def _mlp_fn(idx, cols_cfg=None, rows_cfg=None, impl="pallas"):
  def fn(x, w1, w2, b1, b2):
    h = gather_matmul_cols(x, w1, idx, b1, "relu", implementation=impl,
                           config=cols_cfg)
    return gather_matmul_rows(h, w2, idx, b2, implementation=impl,
                              config=rows_cfg)
  return fn


def _xla_dense(x, w1, w2, b1, b2):
  h = jnp.maximum(x @ w1.T + b1, 0).astype(x.dtype)
  return (h @ w2 + b2).astype(x.dtype)


def bench_mlp(timer, base, smoke, check, dtype=jnp.bfloat16, xla=True,
              variants=False, sink=None):
  d, N, ms_list, densities = mlp_cases(smoke)
  records = []
  itemsize = jnp.dtype(dtype).itemsize
  todo = []  # variant timings run last, after every heuristic record
  for density in densities:
    k = max(1, round(density * N))
    sel_bytes = 2 * k * d * itemsize
    rng = np.random.default_rng(k)
    idx = jnp.asarray(rng.permutation(N)[:k], jnp.int32)
    wsets = []
    for r in range(_copies(sel_bytes)):
      k1, k2, k3, k4 = jax.random.split(jax.random.key(100 + r), 4)
      wsets.append((jax.random.normal(k1, (N, d), dtype) * 0.02,
                    jax.random.normal(k2, (N, d), dtype) * 0.02,
                    jax.random.normal(k3, (N,), dtype) * 0.02,
                    jax.random.normal(k4, (d,), dtype) * 0.02))
    for M in ms_list:
      x = jax.random.normal(jax.random.key(M), (M, d), dtype)
      sets = [(x,) + w for w in wsets]
      xla_gather = _mlp_fn(idx, impl="xla")
      impls = {"pallas": (_mlp_fn(idx), None)}
      if xla:
        impls["xla_gather"] = (xla_gather, None)
        if density == 1.0:
          impls["xla_dense"] = (_xla_dense, None)
      if variants and (M, density) in MLP_VARIANT_SHAPES:
        cols = gather_matmul_triton.choose_cols_config(M, d, k, itemsize)
        rows = gather_matmul_triton.choose_rows_config(M, d, k, itemsize)
        for name, (vary_cols, vary_rows) in MLP_VARIANTS.items():
          cfgs = (vary_cols(cols), vary_rows(rows))
          impls[f"pallas:{name}"] = (_mlp_fn(idx, *cfgs), cfgs)
      for impl, (fn, cfgs) in impls.items():
        if impl.startswith("pallas:"):
          todo.append((impl, fn, cfgs, sets, M, density, sel_bytes))
          continue
        records.append(_mlp_record(timer, base, check, fn, sets, xla_gather,
                                   impl, None, M, d, N, density, dtype,
                                   sel_bytes, sink))
    del wsets
  for impl, fn, cfgs, sets, M, density, sel_bytes in todo:
    xla_gather = None
    records.append(_mlp_record(timer, base, False, fn, sets, xla_gather, impl,
                               cfgs, M, d, N, density, dtype, sel_bytes, sink))
  return records


def topk_cases(smoke):
  """(rows, N, k): OPT-6.7B's union (N 16384, the B32 budgets' smallest, median and largest k), a tp-4 split,
  and an N that is not a power of two."""
  if smoke:
    return [(1, 300, 37), (2, 256, 100)]
  return [(1, 16384, 896), (1, 16384, 4480), (1, 16384, 13824), (4, 4096, 1120), (1, 36864, 9000)]


def bench_topk(timer, base, smoke, check):
  """The union top-k set: pallas kernel vs XLA radix select vs lax.top_k; every result checked for the exact
  lax.top_k set (a mismatch raises)."""
  records = []
  for rows, n, k in topk_cases(smoke):
    rng = np.random.default_rng(n + k)
    # union-like scores: sums of ReLUs (many exact zeros) with a few ties
    scores = jnp.asarray(np.round(np.maximum(rng.normal(size=(rows, n)), 0) * 64) / 64, jnp.float32)
    want = np.sort(np.asarray(jax.lax.top_k(scores, k)[1]), axis=1)
    fns = {"pallas": lambda a: topk_select(a, k, implementation="pallas"),
           "xla": lambda a: topk_select(a, k, implementation="xla"),
           "xla_sort": lambda a: jax.lax.top_k(a, k)[1]}
    for impl, fn in fns.items():
      ms, wall, how, out = timer(fn, [(scores,)])
      got = np.sort(np.asarray(out), axis=1)
      if not np.array_equal(got, want):
        raise AssertionError(f"topk_select {impl} rows={rows} N={n} k={k}: not lax.top_k's set")
      rec = _finish(dict(base, op="topk_select", impl=impl, M=rows, N=n, density=k / n, dtype="float32", ms=ms,
                         ms_wall=wall, timer=how, bytes=rows * n * 4, max_rel_err=0.0, exact_set=True))
      records.append(rec)
  return records


def _mlp_record(timer, base, check, fn, sets, ref_fn, impl, cfgs, M, d, N,
                density, dtype, sel_bytes, sink):
  try:
    ms, wall, how, out = timer(fn, sets)
  except Exception as e:  # pylint: disable=broad-except
    print(f"{impl} M={M} density={density} failed: {type(e).__name__}: "
          f"{str(e)[:300]}")
    ms, wall, how, out = float("nan"), float("nan"), "failed", None
  rec = dict(base, op="gather_mlp", impl=impl, M=M, d=d, N=N,
             density=density, dtype=jnp.dtype(dtype).name, ms=ms,
             ms_wall=wall, timer=how, bytes=sel_bytes)
  if cfgs is not None:
    rec["config"] = [dataclasses.asdict(c) for c in cfgs]
  if check and impl == "pallas" and out is not None:
    rec["max_rel_err"] = _rel_err(out, jax.jit(ref_fn)(*sets[0]))
  rec = _finish(rec)
  if sink is not None:
    sink(rec)
  return rec


def _finish(rec):
  rec["tbps"] = rec["bytes"] / (rec["ms"] * 1e-3) / 1e12
  rec["roofline_frac"] = rec["tbps"] / rec["copy_tbps"]
  for key in KEYS:
    rec.setdefault(key, None)
  return rec


def print_table(records):
  print(f"{'op':10} {'impl':11} {'B':>3} {'S':>5} {'Hq/Hkv':>6} {'M':>4} "
        f"{'dens':>5} {'ms':>8} {'TB/s':>6} {'roof':>5} {'err':>8}")
  for r in records:
    heads = f"{r['Hq']}/{r['Hkv']}" if r["Hq"] else ""
    err = r.get("max_rel_err")
    print(f"{r['op']:10} {r['impl']:11} {r['B'] or '':>3} {r['S'] or '':>5} "
          f"{heads:>6} {r['M'] or '':>4} {r['density']:5.3f} {r['ms']:8.4f} "
          f"{r['tbps']:6.2f} {r['roofline_frac']:5.2f} "
          f"{'' if err is None else f'{err:.1e}':>8}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(_HERE, "results",
                                                    "kernels.jsonl"))
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes, runs on CPU in interpret mode")
  parser.add_argument("--only", choices=("attn", "mlp", "topk", "probe", "matmul", "paged", "all"), default="all",
                      help="probe: the direct attention kernel's selection / length / config / split probes; "
                           "matmul: the decode projections (skinny_matmul vs XLA); paged: paged vs contiguous "
                           "selective decode attention; none of these is part of all")
  parser.add_argument("--families", default=None,
                      help="probe: comma-separated families (selection, length, config, splits, persistent); "
                           "default all. matmul: narrow (the o / down / gate|up grid sweep), opt (OPT-6.7B's fc1 "
                           "from [N, d] rows + ReLU, fc2). paged: mha, gqa (default both)")
  parser.add_argument("--kv-dtype", nargs="+", default=["model"], choices=("model", "bfloat16", "int8", "float8_e4m3fn"),
                      help="attn: the K/V storage of each case ('model'/'bfloat16': the inputs' dtype; int8 / "
                      "float8_e4m3fn: 8 bits with per-token scales), one record each (field kv_dtype)")
  parser.add_argument("--iters", type=int, default=30)
  parser.add_argument("--check", action="store_true",
                      help="also record each pallas result's error vs XLA")
  parser.add_argument("--sweep", default=None,
                      help="run the tuning sweep instead, writing to this path")
  parser.add_argument("--no-xla", action="store_true",
                      help="mlp: time only the pallas kernels (no XLA baselines)")
  parser.add_argument("--mlp-variants", action="store_true",
                      help="mlp: also time the MLP_VARIANTS configs")
  parser.add_argument("--label", default=None,
                      help="stored in every record as kernel_version")
  args = parser.parse_args(argv)
  warnings.filterwarnings("ignore", category=DeprecationWarning)
  on_gpu = jax.default_backend() == "gpu"
  timer = Timer(iters=2 if args.smoke else args.iters, cupti=on_gpu,
                warmup=1 if args.smoke else 3)
  base = common.provenance()
  base["copy_tbps"] = copy_bandwidth(timer, (1 << 20) if args.smoke
                                     else (1 << 30))
  print(f"{base['device']} jax {base['jax']}: copy {base['copy_tbps']:.2f} "
        "TB/s")
  if args.sweep:
    sys.path.insert(0, _HERE)
    import kernels_sweep  # pylint: disable=import-outside-toplevel
    kernels_sweep.run(timer, base, args.only, args.sweep, _finish)
    return []
  if args.label:
    base["kernel_version"] = args.label
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

  def sink(rec):  # one line per record as soon as it exists (survives timeouts)
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(json.dumps(rec) + "\n")

  records = []
  if args.only in ("attn", "all"):
    kv_dtypes = tuple(dict.fromkeys(None if kv in ("model", "bfloat16") else kv for kv in args.kv_dtype))
    for rec in bench_attention(timer, base, args.smoke, args.check, kv_dtypes=kv_dtypes):
      sink(rec)
      records.append(rec)
  if args.only in ("mlp", "all"):
    records += bench_mlp(timer, base, args.smoke, args.check,
                         xla=not args.no_xla, variants=args.mlp_variants,
                         sink=sink)
  if args.only in ("topk", "all"):
    for rec in bench_topk(timer, base, args.smoke, args.check):
      sink(rec)
      records.append(rec)
  if args.only == "probe":
    families = args.families.split(",") if args.families else None
    for rec in bench_attention_probe(timer, base, args.smoke, families=families):
      sink(rec)
      records.append(rec)
  if args.only == "matmul":
    records += bench_matmul(timer, base, args.smoke, sink,
                            families=args.families.split(",") if args.families else None)
  if args.only == "paged":
    records += bench_paged_attention(timer, base, args.smoke, sink,
                                     families=args.families.split(",") if args.families else None)
  print_table(records)
  return records


if __name__ == "__main__":
  main()
