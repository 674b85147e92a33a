"""End-to-end batched greedy decode throughput (a script, not a test).

Random bf16 weights (speed does not depend on values), decode tokens/s with prefill excluded:
  decode_tok_s = B * (N2 - N1) / (t(N2 new tokens) - t(N1 new tokens))
as in shared/anchors.md, plus prefill time, peak device memory, and the roofline fraction
  (weight bytes + KV bytes read per step) / step time / copy bandwidth (measured in the same run).
With torch + transformers present (the GPU image), Hugging Face `generate` with a static cache runs
on the same shapes for a side-by-side ratio.

  python benchmarks/e2e.py --models llama2-7b --batch 16 32 --prompts 2000 --out $OUT/e2e.jsonl
  python benchmarks/e2e.py --smoke            # tiny model on CPU: checks the script end to end
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402
from polar_jax.config import ModelConfig, RopeScaling  # noqa: E402
from polar_jax.generation import generate  # noqa: E402
from polar_jax.model import init_model  # noqa: E402

MODELS: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                             max_position_embeddings=4096, norm_eps=1e-5),
    "llama3.1-8b": ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                               num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                               max_position_embeddings=131072, norm_eps=1e-5, rope_theta=500000.0,
                               rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)),
    "mistral-7b": ModelConfig(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                              max_position_embeddings=32768, norm_eps=1e-5, sliding_window=4096),
    "opt-6.7b": ModelConfig(model_type="opt", vocab_size=50272, hidden_size=4096, intermediate_size=16384,
                            num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                            max_position_embeddings=2048, norm="layer", norm_eps=1e-5, mlp="relu_mlp",
                            activation="relu", attn_bias=True, o_bias=True, mlp_bias=True, positions="learned",
                            tie_word_embeddings=True),
    "tiny": ModelConfig(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512),
}


def weight_bytes_per_step(config: ModelConfig, model) -> int:
  """Bytes of weights a decode step reads: every parameter except an untied input embedding table."""
  from flax import nnx
  total = 0
  for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    arr = leaf.get_value() if hasattr(leaf, "get_value") else leaf
    name = ".".join(map(str, path))
    if name.startswith("pos_embed") or (name.startswith("embed.") and not config.tie_word_embeddings):
      continue
    total += arr.size * arr.dtype.itemsize
  return total


def kv_bytes_per_step(config: ModelConfig, batch: int, mean_len: float, itemsize: int,
                      density_of_layer=lambda layer: 1.0) -> float:
  """K+V bytes attention reads per step, given the mean cache length and each layer's kept fraction."""
  per_layer = 2 * batch * mean_len * config.num_kv_heads * config.head_dim * itemsize
  if config.sliding_window:
    per_layer = per_layer * min(1.0, config.sliding_window / mean_len)
  return sum(per_layer * density_of_layer(i) for i in range(config.num_layers))


def roofline_fraction(bytes_per_step: float, ms_per_step: float, copy_tbps: float) -> float:
  return bytes_per_step / (ms_per_step * 1e-3) / (copy_tbps * 1e12)


def decode_rate(batch: int, n1: int, n2: int, t1: float, t2: float) -> tuple[float, float]:
  """(decode tokens/s, ms per step) from two timed runs with n1 < n2 new tokens."""
  if n2 <= n1 or t2 <= t1:
    raise ValueError(f"need n2 > n1 and t2 > t1, got n1={n1} n2={n2} t1={t1} t2={t2}")
  step_s = (t2 - t1) / (n2 - n1)
  return batch / step_s, step_s * 1e3


def peak_memory_gb() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 1e9


@dataclasses.dataclass
class Setting:
  model: str
  batch: int
  prompt: int
  density: float = 1.0
  mlp: str = "dense"


def run_polar(setting: Setting, model, config: ModelConfig, *, n1: int, n2: int, iters: int,
              copy_tbps: float) -> dict[str, Any]:
  rng = np.random.default_rng(0)
  ids = rng.integers(0, config.vocab_size, (setting.batch, setting.prompt)).astype(np.int32)
  kwargs: dict[str, Any] = {}

  def run(n):
    return generate(model, ids, max_new_tokens=n, **kwargs).tokens

  t1 = common.time_fn(lambda: run(n1), warmup=1, iters=iters)
  t2 = common.time_fn(lambda: run(n2), warmup=1, iters=iters)
  tok_s, ms = decode_rate(setting.batch, n1, n2, t1, t2)
  itemsize = jnp.dtype(model.dtype).itemsize
  mean_len = setting.prompt + (n1 + n2) / 2
  step_bytes = weight_bytes_per_step(config, model) + kv_bytes_per_step(config, setting.batch, mean_len, itemsize)
  prefill_ms = max(t1 - n1 * ms * 1e-3, 0.0) * 1e3
  return dict(system="polar_jax", decode_tok_s=tok_s, ms_per_step=ms, prefill_ms=prefill_ms,
              peak_mem_gb=peak_memory_gb(), roofline_frac=roofline_fraction(step_bytes, ms, copy_tbps),
              step_bytes=step_bytes)


def run_hf_static(setting: Setting, config: ModelConfig, *, n1: int, n2: int, iters: int) -> dict[str, Any] | None:
  """Hugging Face generate with a static cache on the same shapes (random bf16 weights), if available."""
  try:
    import torch
    import transformers
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  hf_cfg = _hf_config(config, transformers)
  with torch.device("cuda"):
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
  ids = torch.randint(0, config.vocab_size, (setting.batch, setting.prompt), device="cuda")

  def timed(n):
    times = []
    for i in range(iters + 1):
      torch.cuda.synchronize()
      t0 = time.perf_counter()
      model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                     do_sample=False, cache_implementation="static", pad_token_id=0)
      torch.cuda.synchronize()
      if i:
        times.append(time.perf_counter() - t0)
    return float(np.median(times))

  with torch.no_grad():
    t1, t2 = timed(n1), timed(n2)
  tok_s, ms = decode_rate(setting.batch, n1, n2, t1, t2)
  peak = torch.cuda.max_memory_allocated() / 1e9
  del model
  torch.cuda.empty_cache()
  return dict(system="hf_static", decode_tok_s=tok_s, ms_per_step=ms, prefill_ms=None, peak_mem_gb=peak,
              roofline_frac=None)


def _hf_config(config: ModelConfig, transformers):
  common_kw = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                   num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                   max_position_embeddings=config.max_position_embeddings)
  if config.model_type == "opt":
    return transformers.OPTConfig(ffn_dim=config.intermediate_size, word_embed_proj_dim=config.hidden_size,
                                  **common_kw)
  cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}[config.model_type]
  kw = dict(intermediate_size=config.intermediate_size, num_key_value_heads=config.num_kv_heads,
            rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta)
  if config.sliding_window:
    kw["sliding_window"] = config.sliding_window
  return cls(**kw, **common_kw)


def plot(path: pathlib.Path, records: list[dict[str, Any]]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  models = sorted({r["model"] for r in records})
  fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
  for ax, m in zip(axes[0], models):
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
      if r["model"] != m:
        continue
      label = "HF static" if r["system"] == "hf_static" else (
          "polar dense" if r["density"] == 1.0 and r["mlp"] == "dense" else f"polar d={r['density']} mlp={r['mlp']}")
      label += f" p{r['prompt']}"
      series.setdefault(label, []).append((r["B"], r["decode_tok_s"]))
    for label, pts in sorted(series.items()):
      pts.sort()
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_title(f"{m} ({records[0]['device']})")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", default=["llama2-7b"], choices=sorted(MODELS))
  p.add_argument("--batch", nargs="+", type=int, default=[16, 32])
  p.add_argument("--prompts", nargs="+", type=int, default=[2000])
  p.add_argument("--n1", type=int, default=8)
  p.add_argument("--n2", type=int, default=72)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--hf", action="store_true", help="also time Hugging Face static-cache generate")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--out", type=pathlib.Path, default=common.RESULTS_DIR / "e2e.jsonl")
  p.add_argument("--plot", type=pathlib.Path, default=None)
  p.add_argument("--smoke", action="store_true", help="tiny model, CPU friendly")
  args = p.parse_args(argv)
  if args.smoke:
    args.models, args.batch, args.prompts, args.n1, args.n2, args.iters = ["tiny"], [2], [24], 1, 48, 3
    args.dtype = "float32"

  copy_tbps = common.copy_bandwidth_tbps(1 << 26 if args.smoke else 1 << 31)
  prov = common.provenance()
  print(f"{prov['device']} jax {prov['jax']}: copy bandwidth {copy_tbps:.2f} TB/s")
  records = []
  for name in args.models:
    config = MODELS[name]
    model = init_model(config, dtype=jnp.dtype(args.dtype))
    for prompt in args.prompts:
      prompt = min(prompt, config.max_position_embeddings - args.n2)
      for b in args.batch:
        s = Setting(name, b, prompt)
        rows = [run_polar(s, model, config, n1=args.n1, n2=args.n2, iters=args.iters, copy_tbps=copy_tbps)]
        if args.hf:
          hf = run_hf_static(s, config, n1=args.n1, n2=args.n2, iters=args.iters)
          if hf:
            rows.append(hf)
        for r in rows:
          rec = dict(prov, model=name, B=b, prompt=prompt, density=s.density, mlp=s.mlp, copy_tbps=copy_tbps,
                     tp=1, **r)
          records.append(rec)
          frac = "-" if rec["roofline_frac"] is None else f"{rec['roofline_frac']:.2f}"
          print(f"{name:12s} {rec['system']:9s} B{b:<4d} prompt {prompt:5d} density {s.density:.3f}: "
                f"{rec['decode_tok_s']:9.1f} tok/s {rec['ms_per_step']:7.2f} ms/step roofline {frac}", flush=True)
    del model
  common.append_jsonl(args.out, records)
  if args.plot:
    plot(args.plot, records)
  print(f"wrote {len(records)} records to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
