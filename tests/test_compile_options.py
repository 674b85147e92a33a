"""The decode loops' XLA options (`polar_jax.compile_options`): what they hold, that they reach the compiler, and
that the user's XLA_FLAGS and `DecodeOptions(loop_graph=False)` win."""

import jax
import jax.numpy as jnp
import pytest

from polar_jax import compile_options as co


@pytest.fixture(autouse=True)
def _no_user_flags(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)


def _loop(x, n):
  return jax.lax.fori_loop(0, n, lambda i, y: y * 2 + i, x)


def test_default_options_add_while_and_conditional():
  kinds = co.decode_loop_options()["xla_gpu_enable_command_buffer"].split(",")
  assert {"WHILE", "CONDITIONAL", "FUSION", "CUSTOM_CALL"} <= set(kinds)


def test_user_flags_and_the_option_win(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=FUSION")
  assert co.decode_loop_options() == {}
  monkeypatch.delenv("XLA_FLAGS")
  assert co.decode_loop_options(loop_graph=False) == {}


def test_options_compile_and_reach_the_compiler(monkeypatch):
  f = co.jit_loop(_loop, static_argnames=("n",))
  x = jnp.arange(3.0)
  assert jnp.array_equal(f(x, n=4), _loop(x, 4))          # this jax's XLA accepts every kind in the list
  assert jnp.array_equal(f.lower(x, n=4).compile()(x), _loop(x, 4))
  monkeypatch.setattr(co, "LOOP_COMMAND_BUFFERS", ("NOT_A_KIND",))
  g = co.jit_loop(_loop, static_argnames=("n",))
  with pytest.raises(Exception, match="NOT_A_KIND"):     # the option is passed to XLA, which checks it
    g(x, n=4)


def test_loop_graph_off_compiles_its_own_program():
  f = co.jit_loop(_loop, static_argnames=("n",))
  x = jnp.ones(2)
  f(x, n=2)
  f(x, n=2, loop_graph=False)
  assert len(f._jitted) == 2  # pylint: disable=protected-access
