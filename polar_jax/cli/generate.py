"""`polar-generate CKPT --prompt TEXT ...`: batched completions, generated once.

Prints each prompt's completion (after a short prefix of the prompt); generation stops at the end-of-sequence and
end-of-turn tokens (e.g. `<|im_end|>` with `--chat`), which are not printed. `--timing` adds the wall time of the
one generation call, the part of it spent compiling, and tokens/s over the rest.

Polar Sparsity: `--routers DIR` (or `--routers default`, the shipped SmolLM2-135M routers) with
`--attn-density X` or `--attn-groups K`; `--selector oracle|random` needs no routers.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from polar_jax.cli import interruptible

PROMPT_PREVIEW_CHARS = 60


def build_sampler(temperature: float | None, top_k: int | None, top_p: float | None):
  """A `polar_jax.sampling.Sampler`: greedy unless a sampling option is given; filters apply in the order top-k,
  top-p, temperature."""
  from polar_jax import sampling
  parts = []
  if top_k is not None:
    parts.append(sampling.TopK(top_k))
  if top_p is not None:
    parts.append(sampling.TopP(top_p))
  if temperature is not None and temperature > 0:
    parts.append(sampling.Temperature(temperature))
  if temperature == 0 or not parts:
    return sampling.Greedy()
  return sampling.Chain(tuple(parts))


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="polar-generate", description=__doc__)
  p.add_argument("ckpt", help="a directory written by polar-convert")
  p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
  p.add_argument("--prompts-file", help="a file with one prompt per line")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=None, help="0 or unset: greedy")
  p.add_argument("--top-k", type=int, default=None)
  p.add_argument("--top-p", type=float, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU, f32 on CPU)")
  p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template (for "
                 "instruction-tuned models such as SmolLM2-135M-Instruct)")
  p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-sequence / end-of-turn tokens")
  p.add_argument("--timing", action="store_true", help="print the wall time of the generation (it runs once: the "
                 "time includes compiling, reported separately) and tokens/s over the time outside compiling")
  p.add_argument("--kernels", choices=("auto", "pallas", "xla"), default="auto",
                 help="decode kernels (polar_jax.DecodeOptions.kernels): auto = Pallas on GPU, XLA elsewhere")
  p.add_argument("--tp", type=int, default=1, help="tensor parallel degree: split heads/KV groups and MLP neurons "
                 "over N devices (polar_jax.sharding)")
  p.add_argument("--dp", type=int, default=1, help="data parallel degree: split the batch over N device groups")
  p.add_argument("--no-fuse", action="store_true", help="keep separate q/k/v and gate/up projections (default: "
                 "one fused matmul each, polar_jax.fusion)")
  add_kv_dtype_arg(p)
  add_sparsity_args(p)
  return p


KV_DTYPE_CHOICES = ("model", "bfloat16", "float16", "float32", "int8", "float8_e4m3fn")


def add_kv_dtype_arg(p: argparse.ArgumentParser) -> None:
  """`--kv-dtype`, shared by polar-generate, polar-serve and polar-eval (read back by `kv_dtype_of`)."""
  p.add_argument("--kv-dtype", choices=KV_DTYPE_CHOICES, default="model",
                 help="KV cache storage: model (default: the model's dtype, or its name), or int8 / float8_e4m3fn "
                 "(8 bits with one scale per token and KV group: half the cache bytes; one device)")


def kv_dtype_of(args) -> str | None:
  """`DecodeOptions.kv_dtype` of `--kv-dtype` (None: the model's dtype)."""
  return None if args.kv_dtype == "model" else args.kv_dtype


def add_sparsity_args(p: argparse.ArgumentParser) -> None:
  """The Polar Sparsity options shared by polar-generate and polar-serve (read back by `build_sparsity`)."""
  sp = p.add_argument_group("Polar Sparsity (decode only; prefill stays dense)")
  sp.add_argument("--routers", help="router directory from polar-train-routers, or 'default' (shipped SmolLM2)")
  sp.add_argument("--attn-density", type=float, default=None, help="fraction of KV groups kept per row, (0, 1]")
  sp.add_argument("--attn-groups", type=int, default=None, help="KV groups kept per row (overrides density)")
  sp.add_argument("--dense-layers", type=int, nargs="*", default=[0], help="layers with dense attention (default 0)")
  sp.add_argument("--selector", choices=("router", "oracle", "random"), default="router")
  sp.add_argument("--mlp", choices=("dense", "router"), default="dense", help="neuron sparsity (ReLU/OPT only)")
  sp.add_argument("--mlp-dense-above", type=float, default=None,
                  help="--mlp router: layers whose neuron budget exceeds this fraction of the MLP run it dense "
                       "(default: SparsityConfig's, 0.6)")
  sp.add_argument("--router-dtype", choices=("float32", "bfloat16", "float16", "int8"), default=None,
                  help="routers' weights in the decode step (default: the model's dtype; int8: the neuron routers "
                       "quantized per column)")


def build_sparsity(args):
  """(SparsityConfig or None, routers directory or None) from the command line.

  `--routers` without `--attn-density`/`--attn-groups` decodes at the density the routers were trained for.
  """
  from polar_jax.routers import read_metadata, routers_dir
  from polar_jax.sparsity import SparsityConfig
  wanted = (args.attn_density is not None or args.attn_groups is not None or args.selector != "router"
            or args.mlp != "dense" or args.routers is not None)
  if not wanted:
    return None, None
  routers = routers_dir(args.routers) if args.routers is not None else None   # "default": the shipped routers
  density = args.attn_density
  if density is None:
    density = read_metadata(routers).get("train_density", 1.0) if routers is not None else 1.0
  cfg = SparsityConfig(attn_density=density, attn_groups=args.attn_groups, dense_layers=tuple(args.dense_layers),
                       selector=args.selector, mlp=args.mlp, router_dtype=args.router_dtype,
                       **({} if args.mlp_dense_above is None else {"mlp_dense_above": args.mlp_dense_above}))
  return cfg, routers


@interruptible("polar-generate")
def main(argv=None) -> int:
  args = parser().parse_args(argv)
  prompts = list(args.prompt)
  if args.prompts_file:
    with open(args.prompts_file, encoding="utf-8") as f:
      prompts += [line.rstrip("\n") for line in f if line.strip()]
  if not prompts:
    print("polar-generate: give at least one --prompt or a --prompts-file", file=sys.stderr)
    return 2
  import polar_jax
  from polar_jax.cli.call_timing import timed_call
  try:
    sampler = build_sampler(args.temperature, args.top_k, args.top_p)
    sampler.validate()
    sparsity, routers_dir = build_sparsity(args)
    if sparsity is not None and args.tp > 1:   # balanced per-shard selection (polar_jax.sharding), shown below
      import dataclasses
      sparsity = dataclasses.replace(sparsity, shards=args.tp)
    mesh = None
    if args.tp * args.dp > 1:
      from polar_jax import sharding
      mesh = sharding.make_mesh(tp=args.tp, dp=args.dp)
    model = polar_jax.load_model(args.ckpt, dtype=args.dtype, mesh=mesh, fuse=not args.no_fuse)
    tok = polar_jax.load_tokenizer(args.ckpt)
    routers = polar_jax.load_routers(routers_dir, model) if routers_dir is not None else None
    ids = encode_prompts(tok, prompts, chat=args.chat)
    stop = () if args.no_stop else stop_tokens(tok, model.config, args.ckpt)
    kwargs = dict(max_new_tokens=args.max_new_tokens, sampler=sampler, stop_tokens=stop, seed=args.seed,
                  sparsity=sparsity, routers=routers)
    kwargs["options"] = polar_jax.DecodeOptions(kernels=args.kernels, kv_dtype=kv_dtype_of(args))
    out, timing = timed_call(lambda: polar_jax.generate(model, ids, **kwargs))
  except (ValueError, FileNotFoundError) as e:
    print(f"polar-generate: {e}", file=sys.stderr)
    return 2
  for i, p in enumerate(prompts):
    print(f"--- [{i}] {preview(p)}\n{completion_text(tok, out.tokens[i, :out.lengths[i]], stop)}\n")
  if sparsity is not None:
    print(f"sparsity: {describe_sparsity(sparsity, model.config)}")
  if args.timing:
    print(describe_timing(timing, int(out.lengths.sum()), len(prompts)))
  return 0


def preview(prompt: str, chars: int = PROMPT_PREVIEW_CHARS) -> str:
  """The prompt's first `chars` characters on one line, quoted; "..." when cut."""
  flat = " ".join(prompt.split())
  return repr(flat if len(flat) <= chars else flat[:chars].rstrip() + "...")


def completion_text(tokenizer, row, stop: tuple[int, ...] = ()) -> str:
  """A row's generated tokens as text, without the stop token that ended it and without special tokens."""
  row = [int(t) for t in row]
  if row and row[-1] in stop:
    row = row[:-1]
  return tokenizer.decode(row, skip_special_tokens=True).strip()


def describe_timing(timing, tokens: int, batch: int) -> str:
  """One line: the call's wall time, its compile part, and generated tokens/s over the rest (prefill + decode)."""
  line = f"generated {tokens} tokens (batch {batch}) in {timing.wall_s:.2f} s wall"
  if timing.compile_s is None:
    return line + " (one call, compilation included; this JAX does not report compile time)"
  line += f", {timing.compile_s:.2f} s of it tracing and compiling"
  if timing.run_s > 0:
    other = f"{timing.run_s:.2f}" if timing.run_s >= 1 else f"{timing.run_s:.3g}"   # 3 digits when short
    line += f"; {tokens / timing.run_s:.1f} tok/s over the other {other} s (prefill + decode)"
  return line


def describe_sparsity(sparsity, config) -> str:
  groups = sparsity.layer_groups(config)
  sparse = [k for k in groups if k is not None]
  kept = (f"{sparse[0]}/{config.num_kv_heads} KV groups in {len(sparse)} of {config.num_layers} layers"
          if sparse and len(set(sparse)) == 1 else
          f"{len(sparse)} sparse layers" if sparse else "all layers dense")
  return f"{kept}, selector {sparsity.selector}, MLP {sparsity.mlp}"


def encode_prompts(tokenizer, prompts, *, chat: bool) -> list[list[int]]:
  if chat:
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for p in prompts]
  return [tokenizer.encode(p) for p in prompts]


def stop_tokens(tokenizer, config, ckpt=None) -> tuple[int, ...]:
  """Token ids that end a row: the model config's and the tokenizer's end-of-sequence tokens, the end-of-turn
  tokens of the chat template (special tokens in it named like `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`) and the
  `eos_token_id` of the checkpoint's `generation_config.json` (Llama 3 lists several there)."""
  ids = set(config.eos_token_ids)
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  template = getattr(tokenizer, "chat_template", None) or ""
  template = " ".join(template.values()) if isinstance(template, dict) else str(template)
  added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
  for text, token_id in added.items():
    name = text.lower()
    if text in template and ("end" in name or "eot" in name):
      ids.add(int(token_id))
  if ckpt is not None:
    gen_config = pathlib.Path(ckpt).expanduser() / "generation_config.json"
    if gen_config.is_file():
      try:
        eos = json.loads(gen_config.read_text(encoding="utf-8")).get("eos_token_id")
      except json.JSONDecodeError:
        eos = None
      ids.update(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
  return tuple(sorted(ids))


if __name__ == "__main__":
  sys.exit(main())
