"""Command-line tools: polar-convert, polar-generate, polar-eval, polar-train-routers.

Every tool's `main(argv)` returns its exit status and is wrapped by `interruptible`: Ctrl-C ends it with one line
on stderr and status 130 (128 + SIGINT, what shells report for an interrupted command), without a traceback.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable

INTERRUPTED_STATUS = 130
_SIGINT = threading.Event()   # set by the tools' SIGINT handler: the process was asked to stop


def interrupt_requested() -> bool:
  """Whether Ctrl-C (SIGINT) arrived since the running tool started, even if the KeyboardInterrupt it raised was
  dropped (Python only prints "Exception ignored" for one raised inside a finalizer or a gc callback)."""
  return _SIGINT.is_set()


def _on_sigint(signum, frame):
  _SIGINT.set()
  signal.default_int_handler(signum, frame)   # raises KeyboardInterrupt


def interruptible(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
  """Decorates a CLI `main`: KeyboardInterrupt -> "`prog`: interrupted" on stderr and exit status 130.

  Cleanup (temporary directories, background writes) belongs to the code that was interrupted, which sees the
  KeyboardInterrupt first (e.g. `conversions.convert` removes its temporary output); this only ends the process
  quietly.
  """
  def wrap(main: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
      _SIGINT.clear()
      main_thread = threading.current_thread() is threading.main_thread()
      previous = signal.signal(signal.SIGINT, _on_sigint) if main_thread else None
      try:
        status = main(*args, **kwargs)
        if not _SIGINT.is_set():
          return status
      except KeyboardInterrupt:
        pass
      finally:
        if main_thread:
          signal.signal(signal.SIGINT, previous)
      print(f"{prog}: interrupted", file=sys.stderr, flush=True)
      return INTERRUPTED_STATUS
    return wrapper
  return wrap
