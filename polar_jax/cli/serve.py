"""`polar-serve CKPT`: an OpenAI-compatible server (completions, chat, streaming, /metrics) over the serving engine.

    polar-serve CKPT --port 8000 --max-batch 32 --max-len 4096
    polar-serve CKPT --routers default --attn-density 0.5          # Polar Sparsity (where measured faster)
    polar-serve CKPT --tp 2                                         # tensor parallel over 2 devices

Then any OpenAI client: `openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from polar_jax.cli import interruptible
from polar_jax.cli.generate import add_kv_dtype_arg, add_sparsity_args, build_sparsity, kv_dtype_of


def parser() -> argparse.ArgumentParser:
  from polar_jax.serving.params import EngineOptions
  defaults = EngineOptions()
  p = argparse.ArgumentParser(prog="polar-serve", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("ckpt", help="a directory written by polar-convert (with its tokenizer)")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--model-name", default=None, help="the model id clients send (default: the directory's name)")
  p.add_argument("--max-batch", type=int, default=16, help="KV cache slots: requests decoded together")
  p.add_argument("--max-len", type=int, default=None,
                 help="tokens per slot, prompt + max_tokens (default: min(4096, the model's context))")
  p.add_argument("--max-waiting", type=int, default=defaults.max_waiting,
                 help="queued requests beyond the running ones; more get 503")
  p.add_argument("--steps-per-round", type=int, default=defaults.steps_per_round,
                 help="decode steps per host round trip")
  p.add_argument("--prefill-rows", type=int, default=defaults.prefill_rows,
                 help="most prompts of one length bucket prefilled together")
  p.add_argument("--prefill-chunk", type=int, default=defaults.prefill_chunk,
                 help="prefill prompts longer than this in chunks of this many tokens, between decode rounds "
                      "(0: whole prompts)")
  p.add_argument("--prefill-chunks-per-round", type=int, default=defaults.prefill_chunks_per_round,
                 help="prompt chunks prefilled between two decode rounds")
  p.add_argument("--step-rows", type=int, nargs="+", default=defaults.step_rows,
                 help="row buckets of the decode rounds (paged layout; default: max-batch and its halves down to 8)")
  p.add_argument("--prefill-chunks-backlog", type=int, default=defaults.prefill_chunks_backlog,
                 help="prompt chunks between two decode rounds while requests wait for free slots")
  p.add_argument("--prefill-key-spans", type=int, default=defaults.prefill_key_spans,
                 help="key spans of the chunk programs: a chunk attends over the smallest holding it (1: always the "
                      "whole slot)")
  p.add_argument("--cost-table", default="measure",
                 help="how each round picks the dense or sparse step: 'measure' (timed at start-up) or a JSON "
                      "file of a CostTable")
  p.add_argument("--sparse-min-rows", type=int, default=None,
                 help="instead of the cost table: the sparse step from this many active rows on (1: always)")
  p.add_argument("--kv-layout", choices=("paged", "contiguous"), default=None,
                 help="KV cache layout: pages handed out as requests grow, with prefix caching and preemption "
                      "(default on one device), or one max-len row per slot (default with --tp above 1)")
  p.add_argument("--page-size", type=int, default=defaults.page_size, help="tokens per KV page (a multiple of 16)")
  p.add_argument("--num-pages", type=int, default=None,
                 help="KV pages (default: --kv-memory-fraction of the free device memory, else the pages of "
                      "max-batch x max-len)")
  p.add_argument("--kv-memory-fraction", type=float, default=None,
                 help="the fraction of the device's free memory the KV pages take")
  p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached prompt pages")
  p.add_argument("--tp", type=int, default=1, help="tensor parallel degree: split KV groups and MLP neurons over N "
                 "devices of this host (polar_jax.sharding)")
  p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU, f32 on CPU)")
  p.add_argument("--no-fuse", action="store_true", help="keep separate q/k/v and gate/up projections")
  p.add_argument("--no-warmup", action="store_true", help="compile programs on first use instead of at start-up")
  p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
  add_kv_dtype_arg(p)
  add_sparsity_args(p)
  return p


def load_model(args):
  """The checkpoint's model, sharded over a mesh of `--tp` devices when above 1."""
  import polar_jax
  from polar_jax import sharding
  mesh = sharding.make_mesh(tp=args.tp) if args.tp > 1 else None
  return polar_jax.load_model(args.ckpt, dtype=args.dtype, mesh=mesh, fuse=not args.no_fuse)


def engine_options(args):
  """The `EngineOptions` of the command line (ValueError for a bad value, e.g. a cost table file that is not one)."""
  from polar_jax.serving import EngineOptions
  return EngineOptions(steps_per_round=args.steps_per_round, sparse_min_rows=args.sparse_min_rows,
                       cost_table=args.cost_table, prefill_chunk=args.prefill_chunk or None,
                       prefill_chunks_per_round=args.prefill_chunks_per_round,
                       prefill_chunks_backlog=args.prefill_chunks_backlog, step_rows=args.step_rows,
                       prefill_key_spans=args.prefill_key_spans,
                       max_waiting=args.max_waiting, prefill_rows=args.prefill_rows, warmup=not args.no_warmup,
                       kv_layout=args.kv_layout or ("contiguous" if args.tp > 1 else "paged"), page_size=args.page_size,
                       num_pages=args.num_pages, kv_memory_fraction=args.kv_memory_fraction,
                       prefix_caching=not args.no_prefix_caching, kv_dtype=kv_dtype_of(args))


def build_engine(args):
  """(engine, tokenizer, model name) from the command line."""
  import polar_jax
  from polar_jax.serving import Engine
  sparsity, routers_dir = build_sparsity(args)
  model = load_model(args)
  tokenizer = polar_jax.load_tokenizer(args.ckpt)
  routers = polar_jax.load_routers(routers_dir, model) if routers_dir is not None else None
  max_len = args.max_len or min(4096, model.config.max_position_embeddings)
  name = args.model_name or pathlib.Path(args.ckpt).resolve().name
  engine = Engine(model, max_batch=args.max_batch, max_len=max_len, sparsity=sparsity, routers=routers,
                  tokenizer=tokenizer, engine_options=engine_options(args), model_name=name)
  return engine, tokenizer, name


def _kv_summary(engine) -> str:
  kv = f", {engine.kv_dtype}" if engine.kv_dtype else ""
  if engine.pages is None:
    return "contiguous" + kv
  layout = engine.pages.layout
  return f"paged ({layout.num_pages} pages of {layout.page_size} tokens{kv})"


@interruptible("polar-serve")
def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:
    import uvicorn

    from polar_jax.serving.server import build_app
  except ImportError as e:
    print(f"polar-serve: {e}; install the server's dependencies: pip install 'polar_jax[serve]'", file=sys.stderr)
    return 2
  try:
    engine, tokenizer, name = build_engine(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"polar-serve: {e}", file=sys.stderr)
    return 2
  print(f"polar-serve: {name}: {engine.compiled_programs} programs compiled in {engine.warmup_s:.1f} s; "
        f"max_batch {engine.max_batch}, max_len {engine.max_len}, tp {args.tp}, step variants "
        f"{sorted(engine.variants)}, KV {_kv_summary(engine)}",
        file=sys.stderr)
  app = build_app(engine, tokenizer, model_name=name)
  uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
  return 0


if __name__ == "__main__":
  sys.exit(main())
