"""Serving load test: the continuous-batching engine in-process under N requests (a script for the GPU, not a test).

Random weights of a named shape (`benchmarks/e2e.py`'s MODELS; bf16), prompts of uniform random length in
[--prompt-len MIN MAX] (default 200-2000 tokens), outputs of uniform random length in [--output-len MIN MAX]
(default 32-512; EOS ignored), arriving all at once (--rate inf) or as a Poisson process at --rate requests/s. An
async client streams every request's tokens. Reported: request and output-token throughput, TTFT, inter-token
latency (each round's gap shared by the tokens it brought), TPOT and end-to-end latency (p50 / p90 / p99), the
programs the engine compiled at start-up and during the run (should be 0). For comparison, static batching runs the
same requests through `polar_jax.generate` in arrival-order batches of --max-batch (every batch decodes the longest
output's tokens; its shapes compiled before timing). One JSON line per system goes to --out with the device, jax
version, date, git commit and the copy bandwidth measured in the same run.

The KV cache is paged by default (--kv-layout, --page-size, --num-pages or --kv-memory-fraction): max_batch can then
exceed what contiguous rows of max_len fit, and the record carries the pages, preemptions and prefix-cache hits.
--shared-prefix N puts the same N tokens before every prompt (prompt lengths then N + the uniform part) to measure
what prefix caching does to TTFT (--no-prefix-caching for the baseline).

  python benchmarks/serve.py --model llama2-7b --requests 64 --max-batch 32
  python benchmarks/serve.py --model llama2-7b --requests 64 --max-batch 32 --density 1 0.5 --rate 4
  python benchmarks/serve.py --model llama2-7b --requests 256 --max-batch 96 --max-len 4096 \\
      --kv-memory-fraction 0.85 --no-static
  python benchmarks/serve.py --model llama2-7b --requests 256 --max-batch 24 --max-len 4096 \\
      --kv-layout contiguous --no-static
  python benchmarks/serve.py --model llama2-7b --requests 128 --max-batch 64 --shared-prefix 1024 --rate 8 --no-static
  python benchmarks/serve.py --model tiny --requests 8          # CPU smoke run (lengths scaled to the tiny model)
"""

from __future__ import annotations

import argparse
import asyncio
import math
import pathlib
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks import common, e2e  # noqa: E402  (e2e sets the GPU memory fraction before jax starts)
import jax  # noqa: E402

from polar_jax.generation import TRACE_COUNTS as GENERATE_TRACES, batch_bucket, generate, length_bucket  # noqa: E402
from polar_jax.cli.generate import add_kv_dtype_arg, kv_dtype_of  # noqa: E402
from polar_jax.kv_cache import storage_dtype  # noqa: E402
from polar_jax.serving import Engine, EngineOptions, SamplingParams, programs  # noqa: E402

TINY_PROMPTS, TINY_OUTPUTS = (8, 64), (4, 32)


def workload(n: int, prompt_len: tuple[int, int], output_len: tuple[int, int], vocab: int, rate: float,
             seed: int, shared_prefix: int = 0) -> tuple[list[list[int]], list[int], np.ndarray]:
  """(prompts, output lengths, arrival times in s from the start): uniform lengths after `shared_prefix` tokens
  common to every prompt, Poisson arrivals (all at 0 for an infinite rate)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(prompt_len[0], prompt_len[1] + 1, n)
  outputs = [int(x) for x in rng.integers(output_len[0], output_len[1] + 1, n)]
  prefix = rng.integers(0, vocab, shared_prefix).tolist()
  prompts = [prefix + rng.integers(0, vocab, int(k)).tolist() for k in lengths]
  arrivals = np.zeros(n) if math.isinf(rate) else np.cumsum(rng.exponential(1.0 / rate, n))
  return prompts, outputs, arrivals


def percentiles(values, qs=(50, 90, 99)) -> dict[str, float | None]:
  v = np.asarray(list(values), np.float64)
  return {f"p{q}": (float(np.percentile(v, q)) if v.size else None) for q in qs}


def inter_token_gaps(times_s: list[float]) -> list[float]:
  """Per token after the first: the gap since the previous burst of tokens, shared by the tokens of its burst (the
  engine hands out a round's tokens together)."""
  gaps, prev, i = [], times_s[0] if times_s else 0.0, 1
  while i < len(times_s):
    j = i
    while j < len(times_s) and times_s[j] == times_s[i]:
      j += 1
    gaps += [(times_s[i] - prev) / (j - i)] * (j - i)
    prev, i = times_s[i], j
  return gaps


async def _drive(engine: Engine, prompts, outputs, arrivals) -> tuple[list[Any], float]:
  t0 = time.perf_counter()

  async def one(i):
    await asyncio.sleep(max(0.0, t0 + arrivals[i] - time.perf_counter()))
    h = engine.submit(prompts[i], SamplingParams(max_tokens=outputs[i], ignore_eos=True, seed=i))
    async for _ in h:
      pass
    return h

  handles = await asyncio.gather(*(one(i) for i in range(len(prompts))))
  return handles, time.perf_counter() - t0


def run_engine(model, args, prompts, outputs, arrivals, sparsity, routers) -> dict[str, Any]:
  opts = EngineOptions(steps_per_round=args.steps_per_round, sparse_min_rows=args.sparse_min_rows,
                       max_waiting=len(prompts), prefill_rows=args.prefill_rows,
                       prefill_chunk=args.prefill_chunk or None,
                       prefill_chunks_per_round=args.prefill_chunks_per_round,
                       prefill_chunks_backlog=args.prefill_chunks_backlog, kv_layout=args.kv_layout,
                       step_rows=args.step_rows,
                       prefill_key_spans=args.prefill_key_spans,
                       page_size=args.page_size,
                       num_pages=args.num_pages, kv_memory_fraction=args.kv_memory_fraction,
                       prefix_caching=not args.no_prefix_caching, kv_dtype=kv_dtype_of(args))
  before = sum(programs.TRACE_COUNTS.values())
  engine = Engine(model, max_batch=args.max_batch, max_len=args.max_len, sparsity=sparsity, routers=routers,
                  engine_options=opts, model_name=args.model)
  warm_traces = sum(programs.TRACE_COUNTS.values()) - before
  try:
    handles, duration = asyncio.run(_drive(engine, prompts, outputs, arrivals))
    stats = engine.stats()
    kv = kv_fields(engine, stats, args.model)
  finally:
    engine.shutdown()
  during = sum(programs.TRACE_COUNTS.values()) - before - warm_traces
  assert all(len(h.token_ids) == m for h, m in zip(handles, outputs)), "a request ended early"
  ttft = [h.first_token_s - h.arrival_s for h in handles]
  e2e_s = [h.finished_s - h.arrival_s for h in handles]
  tpot = [(h.token_times_s[-1] - h.first_token_s) / (len(h.token_ids) - 1) for h in handles if len(h.token_ids) > 1]
  itl = [g for h in handles for g in inter_token_gaps(h.token_times_s)]
  tokens = sum(len(h.token_ids) for h in handles)
  return {"system": "polar_engine", "duration_s": duration, "request_throughput": len(handles) / duration,
          "output_tok_s": tokens / duration, "output_tokens": tokens,
          "ttft_s": percentiles(ttft), "itl_s": percentiles(itl), "tpot_s": percentiles(tpot),
          "e2e_s": percentiles(e2e_s), "programs": engine.compiled_programs, "programs_traced_at_start": warm_traces,
          "programs_compiled_during_run": during, "warmup_s": engine.warmup_s,
          "variant_rounds": stats["variant_rounds"], "bucket_rounds": stats["bucket_rounds"],
          "steps_per_round": args.steps_per_round,
          "decode_rows_mean": stats["decode_rows_mean"], "decode_rows_peak": stats["decode_rows_peak"],
          "sparse_min_rows": args.sparse_min_rows, "prefill_rows": args.prefill_rows,
          "prefill_chunk": args.prefill_chunk,
          "prefill_chunks_per_round": args.prefill_chunks_per_round,
          "prefill_chunks_backlog": args.prefill_chunks_backlog, "step_rows": list(engine.step_rows),
          "prefill_key_spans": args.prefill_key_spans, "prefix_caching": not args.no_prefix_caching,
          "cost_table": stats["cost_table"], **kv}


def kv_fields(engine: Engine, stats: dict[str, Any], model_name: str) -> dict[str, Any]:
  """The KV cache's layout and, paged, its pages, preemptions and prefix-cache tokens (looked up, found)."""
  kv_dtype = str(storage_dtype(engine.model.dtype, engine.kv_dtype))
  if engine.pages is None:
    return {"kv_layout": "contiguous", "kv_dtype": kv_dtype}
  labels = {"model_name": model_name}
  sample = lambda name: engine.metrics.registry.get_sample_value(f"polar:{name}", labels)  # noqa: E731
  layout = engine.pages.layout
  return {"kv_layout": "paged", "kv_dtype": kv_dtype, "page_size": layout.page_size, "num_pages": layout.num_pages,
          "kv_cache_gb": layout.num_pages * layout.page_bytes(engine.config, engine.model.dtype,
                                                              engine.kv_dtype) / 1e9,
          "preemptions": stats["preemptions"], "prefix_cache_queries": sample("prefix_cache_queries_total"),
          "prefix_cache_hits": sample("prefix_cache_hits_total")}


def run_static(model, args, prompts, outputs, sparsity, routers) -> dict[str, Any]:
  """`generate` in batches of max_batch (arrival order), each decoding max(outputs) tokens; shapes compiled first."""
  new = max(outputs)
  batches = [list(range(i, min(i + args.max_batch, len(prompts)))) for i in range(0, len(prompts), args.max_batch)]
  run = lambda b: generate(model, [prompts[i] for i in b], max_new_tokens=new, sparsity=sparsity,  # noqa: E731
                           routers=routers)
  seen = set()
  for b in batches:   # one untimed call per distinct compiled shape
    key = (batch_bucket(len(b)), length_bucket(max(len(prompts[i]) for i in b)))
    if key not in seen:
      seen.add(key)
      jax.block_until_ready(run(b).tokens)
  before = GENERATE_TRACES["generate"]
  t0 = time.perf_counter()
  for b in batches:
    run(b)
  duration = time.perf_counter() - t0
  useful = sum(outputs)
  return {"system": "polar_static", "duration_s": duration, "request_throughput": len(prompts) / duration,
          "output_tok_s": useful / duration, "output_tokens": useful,
          "decoded_tokens": sum(len(b) for b in batches) * new, "programs_compiled_during_run":
          GENERATE_TRACES["generate"] - before, "max_new_tokens": new}


def report(r: dict[str, Any]) -> None:
  lat = "".join(f", {k} p50/p90/p99 " + "/".join(f"{1e3 * r[k][q]:.1f}" for q in ("p50", "p90", "p99")) + " ms"
                for k in ("ttft_s", "itl_s", "e2e_s") if k in r and r[k]["p50"] is not None)
  rows = (f", requests per decode step {r['decode_rows_mean']:.1f} (peak {r['decode_rows_peak']})"
          if "decode_rows_mean" in r else "")
  print(f"{r['system']} (density {r['density']}): {r['request_throughput']:.2f} req/s, {r['output_tok_s']:.1f} "
        f"output tok/s in {r['duration_s']:.1f} s{lat}{rows}; compiled during the run: "
        f"{r['programs_compiled_during_run']}",
        flush=True)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="llama2-7b", choices=sorted(e2e.MODELS))
  p.add_argument("--dtype", default=None, help="default: bfloat16 (float32 for the tiny model)")
  p.add_argument("--requests", type=int, default=64)
  p.add_argument("--prompt-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                 help="uniform prompt lengths (default 200 2000; tiny: 8 64)")
  p.add_argument("--output-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                 help="uniform output lengths, EOS ignored (default 32 512; tiny: 4 32)")
  p.add_argument("--rate", type=float, default=math.inf, help="Poisson arrivals per second (default: all at once)")
  p.add_argument("--max-batch", type=int, default=32)
  p.add_argument("--max-len", type=int, default=None, help="tokens per slot (default: max prompt + max output)")
  p.add_argument("--density", type=float, nargs="+", default=[1.0],
                 help="attention densities of the sparse step, one engine each on the same model and requests "
                 "(random head routers; 1 = dense only; static batching runs at the first)")
  p.add_argument("--sparse-min-rows", type=int, default=None,
                 help="the sparse step from this many active rows on (default: the measured cost table decides)")
  p.add_argument("--prefill-chunk", type=int, default=EngineOptions().prefill_chunk,
                 help="prefill prompts longer than this in chunks between decode rounds (0: whole prompts)")
  p.add_argument("--prefill-key-spans", type=int, default=EngineOptions().prefill_key_spans,
                 help="key spans of the chunk programs (1: every chunk attends over max_len keys)")
  p.add_argument("--prefill-chunks-per-round", type=int, default=EngineOptions().prefill_chunks_per_round,
                 help="prompt chunks prefilled between two decode rounds")
  p.add_argument("--step-rows", type=int, nargs="+", default=None,
                 help="row buckets of the decode rounds (paged; default: max-batch and its halves down to 8)")
  p.add_argument("--prefill-chunks-backlog", type=int, default=EngineOptions().prefill_chunks_backlog,
                 help="prompt chunks between two decode rounds while requests wait for free slots")
  p.add_argument("--steps-per-round", type=int, default=EngineOptions().steps_per_round)
  p.add_argument("--prefill-rows", type=int, default=EngineOptions().prefill_rows)
  p.add_argument("--kv-layout", choices=("paged", "contiguous"), default="paged")
  add_kv_dtype_arg(p)
  p.add_argument("--page-size", type=int, default=EngineOptions().page_size)
  p.add_argument("--num-pages", type=int, default=None, help="KV pages (paged; default: --kv-memory-fraction, else "
                 "max-batch x max-len worth)")
  p.add_argument("--kv-memory-fraction", type=float, default=None,
                 help="the fraction of the free device memory the KV pages take (paged)")
  p.add_argument("--shared-prefix", type=int, default=0, help="the same N random tokens before every prompt")
  p.add_argument("--no-prefix-caching", action="store_true")
  p.add_argument("--no-static", action="store_true", help="skip the static-batching comparison")
  p.add_argument("--no-engine", action="store_true", help="only the static-batching comparison (at the first "
                 "density)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", type=pathlib.Path, default=common.RESULTS_DIR / "serve.jsonl")
  args = p.parse_args(argv)
  tiny = args.model == "tiny"
  args.prompt_len = tuple(args.prompt_len or (TINY_PROMPTS if tiny else (200, 2000)))
  args.output_len = tuple(args.output_len or (TINY_OUTPUTS if tiny else (32, 512)))
  if min(args.prompt_len + args.output_len) < 1 or args.prompt_len[0] > args.prompt_len[1] or \
     args.output_len[0] > args.output_len[1]:
    p.error("--prompt-len / --output-len need 1 <= MIN <= MAX")
  if args.shared_prefix < 0:
    p.error("--shared-prefix needs N >= 0")
  if args.no_engine and args.no_static:
    p.error("--no-engine with --no-static leaves nothing to run")
  args.max_len = args.max_len or args.shared_prefix + args.prompt_len[1] + args.output_len[1]
  config = e2e.MODELS[args.model]
  dtype = args.dtype or ("float32" if tiny else "bfloat16")

  copy_tbps = common.copy_bandwidth_tbps(1 << 26 if tiny else 1 << 31)
  prov = common.provenance()
  print(f"{prov['device']} jax {prov['jax']}: copy bandwidth {copy_tbps:.2f} TB/s", flush=True)
  model = e2e.prepared_model(config, dtype)
  prompts, outputs, arrivals = workload(args.requests, args.prompt_len, args.output_len, config.vocab_size,
                                        args.rate, args.seed, args.shared_prefix)
  routers = e2e.random_routers(config) if min(args.density) < 1.0 else None
  records = []

  def fields(density: float) -> dict[str, Any]:
    return dict(prov, copy_tbps=copy_tbps, model=args.model, dtype=dtype, requests=args.requests,
                prompt_len=list(args.prompt_len), output_len=list(args.output_len),
                rate=None if math.isinf(args.rate) else args.rate, max_batch=args.max_batch, max_len=args.max_len,
                density=density, seed=args.seed, shared_prefix=args.shared_prefix)

  def sparsity_at(density: float):
    from polar_jax.sparsity import SparsityConfig
    return (SparsityConfig(attn_density=density), routers) if density < 1.0 else (None, None)

  runs = [(d, lambda d=d: run_engine(model, args, prompts, outputs, arrivals, *sparsity_at(d)))
          for d in ([] if args.no_engine else args.density)]
  if not args.no_static:   # after the engines: the baseline, at the first density
    d0 = args.density[0]
    runs.append((d0, lambda: run_static(model, args, prompts, outputs, *sparsity_at(d0))))
  for density, run in runs:   # each record is written as soon as it exists
    r = dict(fields(density), **run())
    report(r)
    common.append_jsonl(args.out, [r])
    records.append(r)
  print(f"appended {len(records)} records to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
