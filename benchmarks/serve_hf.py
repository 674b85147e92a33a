"""Hugging Face continuous batching on `benchmarks/serve.py`'s workload (a script for the GPU, not a test).

The peer a PyTorch user has: transformers' `ContinuousBatchingManager` (paged attention, the engine behind
`generate_batch` and `transformers serve`), random bf16 weights of the same shape, the same requests (same seed:
prompt and output lengths, EOS disabled), all submitted at once. Each `--settings` entry runs in turn:

  default   ContinuousBatchingConfig() as it comes
  graphs    CUDA graphs on, the decode fast path's default block table
  tuned     CUDA graphs, max_requests_per_batch = --max-batch x 2, max_batch_tokens 8192, page_size 256

Fields a given transformers version does not know are dropped (and listed in the record's `dropped`). Run it in its
own process, never beside JAX on the same GPU:

  python benchmarks/serve_hf.py --model llama2-7b --requests 128 --settings default tuned --out $OUT/serve.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import sys
import time
from typing import Any

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks import common, e2e  # noqa: E402  (imports jax but never starts a backend here)
from benchmarks.serve import percentiles, workload  # noqa: E402

SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "graphs": {"use_cuda_graph": True},
    "tuned": {"use_cuda_graph": True, "max_batch_tokens": 8192, "page_size": 256},
}


def cb_config(transformers, setting: str, max_batch: int) -> tuple[Any, dict[str, Any], list[str]]:
  """(ContinuousBatchingConfig of `setting`, the fields applied, the fields this transformers does not have)."""
  wanted = dict(SETTINGS[setting])
  if setting == "tuned":
    wanted["max_requests_per_batch"] = 2 * max_batch
  cls = transformers.generation.ContinuousBatchingConfig
  known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(wanted)
  applied = {k: v for k, v in wanted.items() if k in known}
  return cls(**applied), applied, sorted(set(wanted) - set(applied))


def torch_copy_tbps(torch, nbytes: int = 1 << 31, iters: int = 20) -> float:
  """Device copy bandwidth (read + write bytes) with torch, as `common.copy_bandwidth_tbps` measures it in JAX."""
  x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
  y = torch.empty_like(x)
  y.copy_(x)
  torch.cuda.synchronize()
  t0 = time.perf_counter()
  for _ in range(iters):
    y.copy_(x)
  torch.cuda.synchronize()
  seconds = time.perf_counter() - t0
  del x, y
  return 2 * iters * nbytes / seconds / 1e12


def run_setting(model, transformers, setting: str, prompts, outputs, max_batch: int) -> dict[str, Any]:
  config, applied, dropped = cb_config(transformers, setting, max_batch)
  gen = transformers.GenerationConfig(max_new_tokens=max(outputs), do_sample=False, eos_token_id=-1,
                                      pad_token_id=0)
  manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=config)
  t_warm = time.perf_counter()
  if hasattr(manager, "warmup"):
    manager.warmup()
  warmup_s = time.perf_counter() - t_warm
  manager.start()
  try:
    t0 = time.perf_counter()
    ids = [manager.add_request(p, max_new_tokens=n, record_timestamps=True) for p, n in zip(prompts, outputs)]
    done: dict[str, Any] = {}
    while len(done) < len(ids):
      r = manager.get_result(timeout=60)
      if r is None:
        raise RuntimeError(f"Hugging Face continuous batching: no result for 60 s ({len(done)}/{len(ids)} done)")
      if r.error:
        raise RuntimeError(f"Hugging Face continuous batching failed a request: {r.error}")
      done[r.request_id] = (r, time.perf_counter())
    duration = time.perf_counter() - t0
  finally:
    manager.stop(block=True, timeout=30)
    if hasattr(model, "destroy_cached_continuous_batching_manager"):
      model.destroy_cached_continuous_batching_manager()
  results = [done[i] for i in ids]
  tokens = sum(len(r.generated_tokens) for r, _ in results)
  ttft = [r.timestamps[0] - t0 for r, _ in results if r.timestamps]
  tpot = [(r.timestamps[-1] - r.timestamps[0]) / (len(r.timestamps) - 1) for r, _ in results
          if r.timestamps and len(r.timestamps) > 1]
  return {"system": f"hf_continuous_{setting}", "duration_s": duration, "request_throughput": len(ids) / duration,
          "output_tok_s": tokens / duration, "output_tokens": tokens, "ttft_s": percentiles(ttft),
          "tpot_s": percentiles(tpot), "e2e_s": percentiles([t - t0 for _, t in results]),
          "warmup_s": warmup_s, "hf_settings": applied, "dropped": dropped,
          "transformers": transformers.__version__}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="llama2-7b", choices=sorted(set(e2e.MODELS) - {"tiny"}))
  p.add_argument("--requests", type=int, default=64)
  p.add_argument("--prompt-len", type=int, nargs=2, default=(200, 2000), metavar=("MIN", "MAX"))
  p.add_argument("--output-len", type=int, nargs=2, default=(32, 512), metavar=("MIN", "MAX"))
  p.add_argument("--max-batch", type=int, default=32, help="the engine's max_batch these runs are compared with")
  p.add_argument("--settings", nargs="+", default=["default", "tuned"], choices=sorted(SETTINGS))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", type=pathlib.Path, required=True)
  args = p.parse_args(argv)
  import torch
  import transformers
  if not torch.cuda.is_available():
    p.error("needs a CUDA GPU")
  config = e2e.MODELS[args.model]
  prompts, outputs, _ = workload(args.requests, tuple(args.prompt_len), tuple(args.output_len), config.vocab_size,
                                 math.inf, args.seed)
  copy_tbps = torch_copy_tbps(torch)
  torch.manual_seed(args.seed)
  with torch.device("cuda"):
    model = transformers.AutoModelForCausalLM.from_config(e2e._hf_config(config, transformers),
                                                          dtype=torch.bfloat16).eval()
  prov = {"device": torch.cuda.get_device_name(), "jax": None, "torch": torch.__version__,
          "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": common.git_commit()}
  fields = dict(prov, copy_tbps=copy_tbps, model=args.model, dtype="bfloat16", requests=args.requests,
                prompt_len=list(args.prompt_len), output_len=list(args.output_len), rate=None,
                max_batch=args.max_batch, density=1.0, seed=args.seed)
  print(f"{prov['device']} torch {torch.__version__} transformers {transformers.__version__}: copy bandwidth "
        f"{copy_tbps:.2f} TB/s", flush=True)
  for setting in args.settings:
    with torch.no_grad():
      record = dict(fields, **run_setting(model, transformers, setting, prompts, outputs, args.max_batch))
    print(f"{record['system']}: {record['output_tok_s']:.1f} output tok/s in {record['duration_s']:.1f} s "
          f"(warm-up {record['warmup_s']:.1f} s; settings {record['hf_settings']}, dropped {record['dropped']})",
          flush=True)
    common.append_jsonl(args.out, [record])
    torch.cuda.empty_cache()
  return 0


if __name__ == "__main__":
  sys.exit(main())
