"""A submitted request as its caller sees it: tokens as they are made (iterator and async iterator), cancel, result.

The engine's scheduler thread appends tokens and finishes the request; callers read from any thread or event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import AsyncIterator, Iterator

from polar_jax.serving.params import SamplingParams

FINISH_REASONS = ("stop", "length", "cancelled")


class QueueFullError(RuntimeError):
  """The engine's waiting queue is full (`EngineOptions.max_waiting`); try again later."""


class EngineClosedError(RuntimeError):
  """The engine was shut down (or its scheduler failed) and takes no more requests."""


@dataclasses.dataclass(frozen=True)
class RequestOutput:
  """A finished request: its tokens (a stop token that ended it included) and why it ended
  ("stop": a stop token, "length": `max_tokens`, "cancelled")."""

  request_id: int
  prompt_ids: tuple[int, ...]
  token_ids: tuple[int, ...]
  finish_reason: str
  error: str | None = None


class RequestHandle:
  """One request in the engine. Iterate (`for tok in handle`, `async for tok in handle`) for its tokens as they are
  made; `cancel()` ends it (its slot is freed); `result()` waits for the end."""

  def __init__(self, request_id: int, prompt_ids: tuple[int, ...], params: SamplingParams, seed: int,
               stop_ids: tuple[int, ...], on_cancel=None):
    self.request_id = request_id
    self.prompt_ids = prompt_ids
    self.params = params
    self.seed = seed
    self.stop_ids = stop_ids
    self.token_ids: list[int] = []
    self.finish_reason: str | None = None
    self.error: str | None = None
    # timestamps (time.perf_counter): arrival, admitted to a slot, first token, each token, end
    self.arrival_s = time.perf_counter()
    self.admitted_s: float | None = None
    self.first_token_s: float | None = None
    self.finished_s: float | None = None
    self.token_times_s: list[float] = []
    self._cond = threading.Condition()
    self._cancel = threading.Event()
    self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
    self._on_cancel = on_cancel   # wakes an idle scheduler

  # ---- caller side --------------------------------------------------------------------------
  @property
  def finished(self) -> bool:
    return self.finish_reason is not None

  @property
  def cancel_requested(self) -> bool:
    return self._cancel.is_set()

  def cancel(self) -> None:
    """Ends the request at the scheduler's next round (no-op when it has finished)."""
    if self.finished:
      return
    self._cancel.set()
    if self._on_cancel is not None:
      self._on_cancel()

  def result(self, timeout: float | None = None) -> RequestOutput:
    """Waits until the request ends; TimeoutError after `timeout` seconds."""
    with self._cond:
      if not self._cond.wait_for(lambda: self.finished, timeout):
        raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
    return self.output()

  def output(self) -> RequestOutput:
    with self._cond:
      return RequestOutput(self.request_id, self.prompt_ids, tuple(self.token_ids), self.finish_reason or "",
                           self.error)

  def __iter__(self) -> Iterator[int]:
    i = 0
    while True:
      with self._cond:
        self._cond.wait_for(lambda: len(self.token_ids) > i or self.finished)
        new, done = self.token_ids[i:], self.finished
      yield from new
      i += len(new)
      if done and i >= len(self.token_ids):
        return

  async def __aiter__(self) -> AsyncIterator[int]:
    event = asyncio.Event()
    entry = (asyncio.get_running_loop(), event)
    with self._cond:
      self._waiters.append(entry)
    try:
      i = 0
      while True:
        with self._cond:
          new, done = self.token_ids[i:], self.finished
          if not new and not done:
            event.clear()
        if new:
          for t in new:
            yield t
          i += len(new)
          continue
        if done:
          return
        await event.wait()
    finally:
      with self._cond:
        self._waiters.remove(entry)

  # ---- scheduler side -----------------------------------------------------------------------
  def _notify(self) -> None:   # holding self._cond
    self._cond.notify_all()
    for loop, event in self._waiters:
      try:
        loop.call_soon_threadsafe(event.set)
      except RuntimeError:   # the caller's loop is closed
        pass

  def append(self, tokens, now: float) -> None:
    with self._cond:
      if self.first_token_s is None and tokens:
        self.first_token_s = now
      self.token_ids.extend(tokens)
      self.token_times_s.extend([now] * len(tokens))
      self._notify()

  def finish(self, reason: str, now: float, error: str | None = None) -> None:
    with self._cond:
      if self.finish_reason is not None:
        return
      self.finish_reason = reason
      self.error = error
      self.finished_s = now
      self._notify()
