"""Prefill cost in the serving engine (a script, not a test): one prompt chunk prefilled into a slot's KV cache
(`serving.chunked_prefill.prefill_chunk`, what the engine's chunk program runs), against the dense prefill of a
whole prompt of the chunk's length (`CausalLM.prefill`, the engine's bucketed prefill), on random weights.

For each cache layout (contiguous `[B, Hkv, max_len, D]` or paged), each chunk start and each key span (`max_len`,
and the engine's: the smallest of `serving.scheduler.chunk_spans` holding the chunk), the median wall time of one
jitted chunk (the cache donated), its tokens/s and the model FLOPs utilisation it reaches (2 x parameters x tokens
plus the causal attention up to the chunk's end, against `--peak-tflops`).

  python benchmarks/prefill.py --model llama2-7b --max-len 4096 --starts 0 512 1536 3584
  python benchmarks/prefill.py --model tiny --max-len 256 --chunk 32 --starts 0 64 --iters 2 --out /tmp/p.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import common, e2e  # noqa: E402
from polar_jax.kv_cache import KVCache  # noqa: E402
from polar_jax.paged_kv_cache import PagedKVCache, PagedLayout  # noqa: E402
from polar_jax.serving import scheduler  # noqa: E402
from polar_jax.serving.chunked_prefill import prefill_chunk  # noqa: E402


def _cache(config, layout: str, batch: int, max_len: int, page_size: int, dtype):
  if layout == "contiguous":
    return KVCache.init(config, batch, max_len, dtype)
  pages = max_len // page_size
  cache = PagedKVCache.init(config, batch, PagedLayout(page_size, batch * pages, pages), dtype)
  # slot b holds pages [b * pages, (b + 1) * pages) in a shuffled order, as a busy pool would
  perm = np.random.default_rng(0).permutation(batch * pages).reshape(batch, pages)
  return dataclasses.replace(cache, page_table_bp=jnp.asarray(perm, jnp.int32))


def chunk_flops(config, start: int, chunk: int, params: int) -> float:
  """Matmul FLOPs of a chunk: the weights' (2 x parameters x tokens) plus QK^T and PV over keys `[0, start+chunk)`
  (causal: the mean query sees start + chunk / 2 keys)."""
  keys = start + chunk / 2
  attn = 4 * chunk * keys * config.num_heads * config.head_dim * config.num_layers
  return 2 * params * chunk + attn


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="llama2-7b", choices=sorted(e2e.MODELS))
  p.add_argument("--dtype", default=None, help="default: bfloat16 (float32 for the tiny model)")
  p.add_argument("--max-len", type=int, default=4096)
  p.add_argument("--batch", type=int, default=8, help="slots in the cache")
  p.add_argument("--chunk", type=int, default=512)
  p.add_argument("--starts", type=int, nargs="+", default=[0, 512, 1536, 3584])
  p.add_argument("--layouts", nargs="+", default=["contiguous", "paged"], choices=("contiguous", "paged"))
  p.add_argument("--page-size", type=int, default=32)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
  p.add_argument("--out", type=pathlib.Path, default=common.RESULTS_DIR / "prefill.jsonl")
  args = p.parse_args(argv)

  config = e2e.MODELS[args.model]
  args.dtype = args.dtype or ("float32" if args.model == "tiny" else "bfloat16")
  dtype = jnp.dtype(args.dtype)
  model = e2e.prepared_model(config, dtype)
  from flax import nnx
  graphdef, state = nnx.split(model)
  params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(state)) - config.vocab_size * config.hidden_size
  copy = common.copy_bandwidth_tbps()
  prov = common.provenance()
  print(f"{prov['device']} jax {prov['jax']}: copy bandwidth {copy:.2f} TB/s", flush=True)
  tokens = jax.random.randint(jax.random.key(0), (args.chunk,), 0, config.vocab_size, jnp.int32)

  @functools.partial(jax.jit, donate_argnums=(2,), static_argnums=(3,))
  def run_chunk(state, start, cache, key_span):
    logits, cache = prefill_chunk(nnx.merge(graphdef, state), tokens, start, args.chunk, cache, 1,
                                  key_span=key_span)
    return logits, cache

  @jax.jit
  def run_prefill(state):
    cache = KVCache.init(config, 1, args.chunk, dtype)
    logits, cache = nnx.merge(graphdef, state).prefill(tokens[None], jnp.full((1,), args.chunk, jnp.int32), cache)
    return logits

  records = []
  base_s = common.time_fn(lambda: run_prefill(state), iters=args.iters)
  base = {"system": "prefill", "layout": None, "start": 0, "ms": base_s * 1e3,
          "tok_s": args.chunk / base_s, "mfu": chunk_flops(config, 0, args.chunk, params) / base_s / 1e12
          / args.peak_tflops}
  records.append(base)
  print(f"dense prefill of {args.chunk} tokens: {base['ms']:.2f} ms ({base['tok_s']:.0f} tok/s, "
        f"MFU {base['mfu']:.2f})", flush=True)
  for layout in args.layouts:
    holder = [_cache(config, layout, args.batch, args.max_len, args.page_size, dtype)]

    def once(start, span):
      logits, holder[0] = run_chunk(state, jnp.int32(start), holder[0], span)
      return logits

    spans = scheduler.chunk_spans(args.max_len, args.chunk, 4)
    for start in args.starts:
      if start + args.chunk > args.max_len:
        continue
      for span in sorted({args.max_len, scheduler.span_for(start + args.chunk, spans)}):
        s = common.time_fn(lambda: once(start, span), iters=args.iters)
        rec = {"system": "chunk", "layout": layout, "start": start, "key_span": span, "ms": s * 1e3,
               "tok_s": args.chunk / s, "mfu": chunk_flops(config, start, args.chunk, params) / s / 1e12
               / args.peak_tflops}
        records.append(rec)
        print(f"{layout} chunk at {start}, keys [0, {span}): {rec['ms']:.2f} ms ({rec['tok_s']:.0f} tok/s, "
              f"MFU {rec['mfu']:.2f}; {rec['ms'] / base['ms']:.2f}x the dense prefill)", flush=True)
  common.append_jsonl(args.out, [{**prov, "model": args.model, "dtype": args.dtype, "max_len": args.max_len,
                                  "chunk": args.chunk, "page_size": args.page_size, "copy_tbps": copy, **r}
                                 for r in records])
  print(f"appended {len(records)} records to {args.out}")


if __name__ == "__main__":
  main()
