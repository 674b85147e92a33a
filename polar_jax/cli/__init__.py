"""Command-line tools: polar-convert, polar-generate, polar-eval, polar-train-routers.

Every tool's `main(argv)` returns its exit status and is wrapped by `interruptible`: Ctrl-C ends it with one line
on stderr and status 130 (128 + SIGINT, what shells report for an interrupted command), without a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

INTERRUPTED_STATUS = 130


def interruptible(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
  """Decorates a CLI `main`: KeyboardInterrupt -> "`prog`: interrupted" on stderr and exit status 130.

  Cleanup (temporary directories, background writes) belongs to the code that was interrupted, which sees the
  KeyboardInterrupt first (e.g. `conversions.convert` removes its temporary output); this only ends the process
  quietly.
  """
  def wrap(main: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
      try:
        return main(*args, **kwargs)
      except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED_STATUS
    return wrapper
  return wrap
