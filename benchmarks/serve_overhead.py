"""The serving engine's scheduling overhead (a script for the GPU, not a test): its decode steps at full occupancy
against `benchmarks/e2e.py`'s decode loop at the same batch and context, on the same model in the same process.

The engine gets --batch requests of exactly --prompt random tokens at once, prefilled whole (no chunks) before its
first round, each asked for --new tokens with EOS ignored, so every round runs all rows at contexts prompt ..
prompt + new. Its seconds per step: from a request's first token to its last, over the steps between (the median
over requests; the host's work, the per-row sampling and stop checks, the page table and the paged kernel
included). The decode loop is `generate`'s own step in one `fori_loop`, timed as `e2e.py` times it:
(t(new) - t(8)) / (new - 8) from the same prefilled cache. Each --kv-layout runs its own engine (contiguous is
the loop's own cache: the difference is the engine's work; paged adds the page table and the paged kernel).
One JSON line per (layout, density) goes to --out with the device, jax version, date, commit and the copy
bandwidth measured in the same run.

  python benchmarks/serve_overhead.py --model llama2-7b --batch 32 --prompt 2000 --new 256
  python benchmarks/serve_overhead.py --model tiny             # CPU smoke run
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks import common, e2e  # noqa: E402  (e2e sets the GPU memory fraction before jax starts)

from polar_jax.serving import Engine, EngineOptions, SamplingParams  # noqa: E402

N1 = 8   # the decode loop's short run: the steps between N1 and --new are timed


def engine_step_s(model, prompts: list[list[int]], new: int, layout: str, sparsity, routers) -> tuple[float, dict]:
  """Median seconds per decode step of the engine with every prompt running (and the engine's stats)."""
  opts = EngineOptions(prefill_chunk=None, kv_layout=layout, sparse_min_rows=1 if sparsity is not None else None,
                       max_waiting=len(prompts))
  max_len = len(prompts[0]) + new
  with Engine(model, max_batch=len(prompts), max_len=max_len, sparsity=sparsity, routers=routers,
              engine_options=opts) as engine:
    handles = [engine.submit(p, SamplingParams(max_tokens=new, ignore_eos=True)) for p in prompts]
    for h in handles:
      h.result(timeout=600)
    stats = engine.stats()
  assert stats["decode_rows_peak"] == len(prompts), "not every request ran in the same steps"
  per_step = [(h.token_times_s[-1] - h.token_times_s[0]) / (len(h.token_ids) - 1) for h in handles]
  return statistics.median(per_step), stats


def loop_step_s(model, prompts: list[list[int]], new: int, sparsity, routers, iters: int) -> float:
  t1, t2, _, _ = e2e.time_decode_loop(model, np.asarray(prompts, np.int32), sparsity, routers, n1=N1, n2=new,
                                      iters=iters)
  return (t2 - t1) / (new - N1)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="llama2-7b", choices=sorted(e2e.MODELS))
  p.add_argument("--dtype", default=None, help="default: bfloat16 (float32 for the tiny model)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--prompt", type=int, default=None, help="prompt tokens of every request (default 2000; tiny 24)")
  p.add_argument("--new", type=int, default=None, help="tokens each request makes (default 256; tiny 24)")
  p.add_argument("--density", type=float, nargs="+", default=[1.0], help="attention densities (1 = dense)")
  p.add_argument("--kv-layout", nargs="+", choices=("paged", "contiguous"), default=["contiguous", "paged"])
  p.add_argument("--iters", type=int, default=3, help="timed runs of the decode loop (the fastest is used)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", type=pathlib.Path, default=common.RESULTS_DIR / "serve_overhead.jsonl")
  args = p.parse_args(argv)
  tiny = args.model == "tiny"
  args.prompt = args.prompt or (24 if tiny else 2000)
  args.new = args.new or (24 if tiny else 256)
  if args.batch < 1 or args.prompt < 1 or args.new <= N1:
    p.error(f"--batch and --prompt need >= 1 and --new > {N1}")
  config = e2e.MODELS[args.model]
  dtype = args.dtype or ("float32" if tiny else "bfloat16")
  copy_tbps = common.copy_bandwidth_tbps(1 << 26 if tiny else 1 << 31)
  prov = common.provenance()
  print(f"{prov['device']} jax {prov['jax']}: copy bandwidth {copy_tbps:.2f} TB/s", flush=True)
  model = e2e.prepared_model(config, dtype)
  rng = np.random.default_rng(args.seed)
  prompts = rng.integers(0, config.vocab_size, (args.batch, args.prompt)).tolist()
  routers = e2e.random_routers(config) if min(args.density) < 1.0 else None
  records: list[dict[str, Any]] = []
  for density in args.density:
    from polar_jax.sparsity import SparsityConfig
    sparsity = SparsityConfig(attn_density=density) if density < 1.0 else None
    used = routers if sparsity is not None else None
    loop_s = loop_step_s(model, prompts, args.new, sparsity, used, args.iters)
    for layout in args.kv_layout:
      step_s, stats = engine_step_s(model, prompts, args.new, layout, sparsity, used)
      r = dict(prov, copy_tbps=copy_tbps, model=args.model, dtype=dtype, batch=args.batch, prompt=args.prompt,
               new=args.new, density=density, kv_layout=layout, engine_step_ms=1e3 * step_s,
               loop_step_ms=1e3 * loop_s, overhead=step_s / loop_s - 1.0,
               steps_per_round=EngineOptions().steps_per_round, variant_rounds=stats["variant_rounds"])
      print(f"density {density:g}, {layout}: engine {1e3 * step_s:.2f} ms/step, decode loop {1e3 * loop_s:.2f} "
            f"ms/step: overhead {100 * r['overhead']:+.1f}%", flush=True)
      common.append_jsonl(args.out, [r])
      records.append(r)
  print(f"appended {len(records)} records to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
