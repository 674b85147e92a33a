"""Tensor-parallel decoding (polar_jax.sharding) on CPU devices.

The sharded checks need several JAX devices, which must be configured before JAX is imported, so they
run in subprocesses (`tests/sharding_check.py`): two processes with 8 host devices each (tp 2 and 4, dense and
sparse, MHA / GQA / OPT, load_model(mesh=), stream; in two halves that run side by side), and two processes x 2
CPU devices joined by `jax.distributed` with the gloo CPU collectives (tp 4 equals one device).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from conftest import TEST_XLA_FLAGS

SCRIPT = pathlib.Path(__file__).with_name("sharding_check.py")


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = TEST_XLA_FLAGS   # the check sets its own device count
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_multi():
  port = _free_port()
  return [subprocess.Popen([sys.executable, str(SCRIPT), "multi", str(rank), str(port)], env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("part,oks,last", [("a", 9, "OK errors"), ("b", 8, "OK stream gqa dp2 tp2 router")])
def test_tensor_parallel_equals_one_device(part, oks, last):
  r = subprocess.run([sys.executable, str(SCRIPT), "single", part], env=_env(), capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0 and "DONE" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]
  assert r.stdout.count("OK ") == oks, r.stdout
  assert last in r.stdout, r.stdout


@pytest.mark.slow
def test_two_processes_tp4_equals_one_device():
  """2 processes x 2 CPU devices, jax.distributed + gloo collectives: tp 4 (dense and router-sparse) with generate
  and stream, and stream with dp 2 x tp 2 (rows split over the processes): every process gets every token."""
  procs = _start_multi()
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=900)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      out, _ = p.communicate()
    outs.append((p.returncode, out))
  for rc, out in outs:
    assert rc == 0 and "DONE" in out and out.count("OK multi") == 4, out[-4000:]
    assert "OK multi stream gqa dp2 tp2 router" in out, out[-4000:]


def test_mesh_errors_on_one_device():
  from polar_jax import sharding
  with pytest.raises(ValueError, match="needs 64 devices"):
    sharding.make_mesh(tp=64)
  with pytest.raises(ValueError, match="tp must be"):
    sharding.make_mesh(tp=0)


def test_balanced_selection_single_device():
  import jax.numpy as jnp
  from conftest import LLAMA_MHA_8H
  from polar_jax import sharding
  from polar_jax.sparsity import SparsityConfig
  scores = jnp.array([[0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.9, 0.8]])
  assert sharding.balanced_topk(scores, 2, 2).tolist() == [[0, 3], [1, 2]]    # one group from each half
  assert sharding.balanced_topk(scores, 2, 1).tolist() == [[0, 1], [2, 3]]    # global top-k
  cfg = dataclasses.replace(LLAMA_MHA_8H, max_position_embeddings=64)
  # 0.3 x 8 = 2.4 -> 2 globally; balanced over 4 shards: round(0.3 x 2) = 1 per shard -> 4.
  assert SparsityConfig(attn_density=0.3).layer_groups(cfg) == (None, 2)
  assert SparsityConfig(attn_density=0.3, shards=4).layer_groups(cfg) == (None, 4)
  assert SparsityConfig(attn_density=0.5, shards=2).layer_groups(cfg) == (None, 4)
  with pytest.raises(ValueError, match="divide evenly"):
    SparsityConfig(attn_density=0.5, shards=3).layer_groups(cfg)
