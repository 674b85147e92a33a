"""The serving engine on tensor-parallel models (CPU host devices in a subprocess: tests/serving_tp_check.py)."""

import os
import pathlib
import subprocess
import sys

import pytest

from conftest import TEST_XLA_FLAGS

SCRIPT = pathlib.Path(__file__).with_name("serving_tp_check.py")


@pytest.mark.slow
def test_sharded_engine_equals_the_unsharded_one():
  env = dict(os.environ)
  env["XLA_FLAGS"] = TEST_XLA_FLAGS   # the check sets its own device count
  r = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1200)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
  oks = [line for line in r.stdout.splitlines() if line.startswith("OK ")]
  assert len(oks) == 5, r.stdout
