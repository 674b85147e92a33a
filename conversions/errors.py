"""Errors and warnings raised by the converters."""

from __future__ import annotations


class ConversionError(ValueError):
  """A checkpoint cannot be converted; the message names the file, tensor or setting at fault."""


class ConversionWarning(UserWarning):
  """Something was skipped during a conversion (e.g. no tokenizer), but the weights are complete."""


def name_list(names, limit: int = 20) -> str:
  """`a, b, c` for at most `limit` names, then `... (N more)`."""
  names = list(names)
  shown = ", ".join(names[:limit])
  if len(names) > limit:
    shown += f", ... ({len(names) - limit} more)"
  return shown
