"""Incremental detokenization with stop strings: the text of a request as its tokens arrive.

Every `add` decodes the tokens so far and hands out only text that can no longer change: a trailing incomplete
UTF-8 character ("\\ufffd") and a trailing piece that could begin a stop string are held back. When a stop string
appears, the text is cut before it and the stream is `stopped` (the caller then cancels the request). Token ids in
`hidden_ids` (the stop tokens that ended the request) are left out of the text.
"""

from __future__ import annotations

from typing import Iterable, Sequence

_REPLACEMENT = "\ufffd"


class TextStream:
  """Text of one request, as safe-to-send increments."""

  def __init__(self, tokenizer, stop: Sequence[str] = (), hidden_ids: Iterable[int] = ()):
    self.tokenizer = tokenizer
    self.stop = tuple(s for s in stop if s)
    self.hidden = frozenset(int(i) for i in hidden_ids)
    self.ids: list[int] = []
    self.text = ""        # the text handed out so far
    self.stopped = False  # a stop string was found (the text ends before it)

  def _decode(self) -> str:
    return self.tokenizer.decode([i for i in self.ids if i not in self.hidden], skip_special_tokens=True)

  def add(self, tokens: Iterable[int]) -> str:
    """Appends tokens; returns the new text that is safe to send ("" when nothing is)."""
    if self.stopped:
      return ""
    self.ids.extend(int(t) for t in tokens)
    full = self._decode()
    start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
    hits = [(i, s) for s in self.stop if (i := full.find(s, start)) >= 0]
    if hits:
      cut = min(i for i, _ in hits)
      self.stopped = True
      return self._advance(full[:cut])
    end = len(full.rstrip(_REPLACEMENT))
    hold = 0
    for s in self.stop:   # the longest tail of the text that begins a stop string
      for k in range(min(len(s) - 1, end), hold, -1):
        if full[end - k:end] == s[:k]:
          hold = k
          break
    return self._advance(full[:end - hold])

  def finish(self) -> str:
    """The rest of the text once the request has ended (held-back pieces included)."""
    if self.stopped:
      return ""
    return self._advance(self._decode())

  def _advance(self, text: str) -> str:
    if len(text) <= len(self.text) or not text.startswith(self.text):
      return ""
    new = text[len(self.text):]
    self.text = text
    return new
