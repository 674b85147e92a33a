"""`polar-convert SRC OUT [--dtype float32|bfloat16|float16] [--force]`.

Converts a Hugging Face model directory or a `llama` or `qwen2` `.gguf` file (float or quantized,
K-quants included) into a polar_jax checkpoint directory (see `polar_jax.checkpoint`).
"""

from __future__ import annotations

import argparse
import sys
import warnings

from polar_jax.cli import interrupt_requested, interruptible


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="polar-convert",
      description="Convert a Hugging Face model directory or a llama or qwen2 .gguf file into a polar_jax checkpoint.")
  p.add_argument("src", help="HF model directory (config.json + safetensors/.bin) or a .gguf file")
  p.add_argument("out", help="checkpoint directory to create")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                 help="parameter dtype (default: the source's dtype for HF, float32 for GGUF)")
  p.add_argument("--force", action="store_true", help="replace OUT if it exists")
  p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  return p


@interruptible("polar-convert")
def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  from conversions import ConversionError, ConversionWarning, convert
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", ConversionWarning)
      r = convert(args.src, args.out, dtype=args.dtype, force=args.force, progress=not args.no_progress,
                  cancelled=interrupt_requested)
  except ConversionError as e:
    print(f"polar-convert: error: {e}", file=sys.stderr)
    return 1
  for w in caught:
    if issubclass(w.category, ConversionWarning):
      print(f"polar-convert: warning: {w.message}", file=sys.stderr)
    else:
      warnings.showwarning(w.message, w.category, w.filename, w.lineno)
  c = r.config
  size = sum(f.stat().st_size for f in r.out.rglob("*") if f.is_file())
  print(f"converted {args.src} ({r.source_format}) -> {r.out}\n"
        f"  {c.model_type}: {c.num_layers} layers, hidden {c.hidden_size}, heads {c.num_heads}/{c.num_kv_heads} "
        f"(q/kv), vocab {c.vocab_size}, tied embeddings {c.tie_word_embeddings}\n"
        f"  {r.tensor_count} tensors, {r.parameter_count:,} parameters, {r.dtype}, {size / 2**20:.1f} MiB on disk\n"
        f"  tokenizer: {', '.join(r.tokenizer_files) if r.tokenizer_files else 'none'}\n"
        f"  {r.seconds:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
