"""Wall time of one call, with the part JAX spent tracing and compiling inside it (`polar-generate --timing`).

The call runs once: nothing is repeated to warm it up. JAX reports each trace, lowering and backend compile as a
time span (`jax.monitoring`); their union within the call is the compile time, and the rest of the wall time is
what running the program took (for `generate`: prefill, decode and host transfers).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# The spans JAX records around tracing, lowering to MLIR and compiling (jax._src.dispatch).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


@dataclasses.dataclass(frozen=True)
class CallTiming:
  """Seconds of one call: `wall_s` in all, `compile_s` of it tracing and compiling (None: this JAX does not
  report compile spans, so the wall time includes an unknown compile time)."""

  wall_s: float
  compile_s: float | None

  @property
  def run_s(self) -> float | None:
    """Wall time outside tracing and compiling, or None when the compile time is unknown."""
    return None if self.compile_s is None else max(self.wall_s - self.compile_s, 0.0)


def union_seconds(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
  """Total length of the union of `(start, end)` spans clipped to `[lo, hi]` (nested traces count once)."""
  total, reach = 0.0, lo
  for start, end in sorted((max(s, lo), min(e, hi)) for s, e in spans):
    if end > reach:
      total += end - max(start, reach)
      reach = end
  return total


def timed_call(fn: Callable[[], T]) -> tuple[T, CallTiming]:
  """Runs `fn()` once; returns its result and its `CallTiming`. `fn` must block until its work is done (e.g. return
  host arrays, as `polar_jax.generate` does)."""
  import jax.monitoring as monitoring
  spans: list[tuple[float, float]] = []

  def listener(event: str, start: float, end: float, **_) -> None:
    if event in COMPILE_EVENTS:
      spans.append((start, end))

  can_listen = hasattr(monitoring, "register_event_time_span_listener") and hasattr(
      monitoring, "unregister_event_time_span_listener")
  if can_listen:
    monitoring.register_event_time_span_listener(listener)
  t0 = time.time()   # the clock JAX's spans use
  try:
    result = fn()
  finally:
    t1 = time.time()
    if can_listen:
      monitoring.unregister_event_time_span_listener(listener)
  return result, CallTiming(t1 - t0, union_seconds(spans, t0, t1) if can_listen else None)
