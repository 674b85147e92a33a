"""Greedy parity of the paged serving engine on the device it runs on (a check for the GPU, where the paged decode
step runs the Pallas kernel that the CPU tests replace by its XLA reference).

Random weights of a named shape (`benchmarks/e2e.py`'s MODELS), float32 by default; random prompts, some sharing a
prefix. Each case serves the prompts through an `Engine` and compares every request's greedy tokens with
`polar_jax.generate` for the prompt alone (contiguous cache, the contiguous kernel):
  * paged: enough pages for every request;
  * preempt: a quarter of those pages, so requests are preempted and recomputed;
  * contiguous: the contiguous layout, the baseline of the comparison.
Prints the requests whose tokens all match, the first mismatch of the others, the preemptions and prefix-cache
hits; exits 1 when a float32 case mismatches (in bf16 the two kernels' rounding may flip near ties: reported only).

  python benchmarks/serve_parity.py                          # tiny model, float32
  python benchmarks/serve_parity.py --model llama2-7b --dtype bfloat16 --requests 16 --max-len 1024
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks import e2e  # noqa: E402  (e2e sets the GPU memory fraction before jax starts)

from polar_jax import generate  # noqa: E402
from polar_jax.paged import pages_needed  # noqa: E402
from polar_jax.serving import Engine, EngineOptions, SamplingParams  # noqa: E402


def prompts_for(n: int, max_len: int, vocab: int, seed: int) -> tuple[list[list[int]], list[int]]:
  """(prompts, max_tokens): half of the prompts start with one shared prefix of max_len / 4 tokens."""
  rng = np.random.default_rng(seed)
  prefix = rng.integers(0, vocab, max_len // 4).tolist()
  prompts = []
  for i in range(n):
    own = rng.integers(0, vocab, int(rng.integers(1, max_len // 4))).tolist()
    prompts.append(prefix + own if i % 2 else own)
  return prompts, [min(max_len // 2, max_len - len(p)) for p in prompts]


def serve(model, args, prompts, max_tokens, **kv) -> tuple[list[list[int]], dict]:
  opts = EngineOptions(prefill_chunk=args.prefill_chunk, max_waiting=len(prompts), **kv)
  with Engine(model, max_batch=args.max_batch, max_len=args.max_len, engine_options=opts) as eng:
    outs = eng.generate(prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens])
    stats = eng.stats()
    hits = eng.metrics.registry.get_sample_value("polar:prefix_cache_hits_total", {"model_name": "polar"})
  return [list(o.token_ids) for o in outs], dict(preemptions=stats.get("preemptions"), prefix_hits=hits)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="tiny", choices=sorted(e2e.MODELS))
  p.add_argument("--dtype", default="float32")
  p.add_argument("--requests", type=int, default=12)
  p.add_argument("--max-batch", type=int, default=4)
  p.add_argument("--max-len", type=int, default=256)
  p.add_argument("--prefill-chunk", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  config = e2e.MODELS[args.model]
  model = e2e.prepared_model(config, args.dtype)
  prompts, max_tokens = prompts_for(args.requests, args.max_len, config.vocab_size, args.seed)
  out = generate(model, prompts, max_new_tokens=max(max_tokens))   # no stop tokens, as ignore_eos
  ref = [out.tokens[i, :m].tolist() for i, m in enumerate(max_tokens)]
  full = args.max_batch * pages_needed(args.max_len, 16)
  cases = {"paged": dict(num_pages=full), "preempt": dict(num_pages=max(full // 4, pages_needed(args.max_len, 16))),
           "contiguous": dict(kv_layout="contiguous")}
  failed = False
  for name, kv in cases.items():
    got, info = serve(model, args, prompts, max_tokens, **kv)
    same = [g == r for g, r in zip(got, ref)]
    first = next(((i, next(j for j, (a, b) in enumerate(zip(g, r)) if a != b))
                  for i, (g, r) in enumerate(zip(got, ref)) if g != r), None)
    print(f"{name}: {sum(same)}/{len(same)} requests equal generate; first mismatch (request, token) {first}; {info}",
          flush=True)
    failed |= not all(same) and args.dtype == "float32"
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
