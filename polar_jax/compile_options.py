"""XLA compile options of the decode loops: `generation._generate_program` and the benchmarks' greedy loop.

On GPUs XLA records runs of kernels into command buffers (CUDA graphs) by default, but not `while` loops: each
decode step's kernels replay as graphs, and the loop's condition and trip go back through the host runtime
between steps. Adding WHILE and CONDITIONAL to `xla_gpu_enable_command_buffer` lets the whole decode loop run
as one graph (CUDA conditional nodes) with no host work between steps. Measured on one H100
(`benchmarks/results/e2e_experiments.jsonl`, LLaMA-2-7B B16 prompt 2000 density 0.5, one call, two runs each):
1998.5 / 2002.6 tok/s with WHILE and CONDITIONAL vs 1991.2 / 1996.0 with XLA's default list, and 1959.2 / 1961.0
with command buffers off. `DecodeOptions.loop_graph` turns it off.

Options are per compiled program (`jax.jit(..., compiler_options=...)`), so the process-wide `XLA_FLAGS` stay
the user's: a `--xla_gpu_enable_command_buffer=...` there wins (the loops then take no option of their own).
Off GPU the option is parsed and ignored.
"""

from __future__ import annotations

import functools
import os

import jax

# XLA's default command-buffer kinds (xla/debug_options_flags.cc) plus the two that capture `while` loops.
LOOP_COMMAND_BUFFERS = ("FUSION", "CUBLAS", "CUBLASLT", "CUSTOM_CALL", "CUDNN", "DYNAMIC_SLICE_FUSION",
                        "WHILE", "CONDITIONAL")

_FLAG = "xla_gpu_enable_command_buffer"


def decode_loop_options(loop_graph: bool = True) -> dict[str, str]:
  """`compiler_options` for a program holding the decode loop: the whole loop as one command buffer, unless
  `loop_graph` is off or the user's `XLA_FLAGS` already set the command-buffer kinds."""
  if not loop_graph or _FLAG in os.environ.get("XLA_FLAGS", ""):
    return {}
  return {_FLAG: ",".join(LOOP_COMMAND_BUFFERS)}


class jit_loop:  # pylint: disable=invalid-name  (used as a decorator, like jax.jit)
  """`jax.jit(fun, **jit_kwargs)` compiled with `decode_loop_options(loop_graph)`: one jitted function per
  distinct compiler options, so `DecodeOptions(loop_graph=False)` compiles its own program. Calls and `.lower`
  take `loop_graph=` (default True) and go to the jitted function of those options."""

  def __init__(self, fun, **jit_kwargs):
    self._fun, self._jit_kwargs, self._jitted = fun, jit_kwargs, {}
    functools.update_wrapper(self, fun)

  def current(self, loop_graph: bool = True):
    options = decode_loop_options(loop_graph)
    key = tuple(sorted(options.items()))
    if key not in self._jitted:
      self._jitted[key] = jax.jit(self._fun, compiler_options=options or None, **self._jit_kwargs)
    return self._jitted[key]

  def __call__(self, *args, loop_graph: bool = True, **kwargs):
    return self.current(loop_graph)(*args, **kwargs)

  def lower(self, *args, loop_graph: bool = True, **kwargs):
    return self.current(loop_graph).lower(*args, **kwargs)
