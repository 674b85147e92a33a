"""The decode-step cost table: seconds per step of each step variant, by active rows and context length.

The engine measures one at warm-up (`measure_table`: each variant's decode round timed at a few occupancies and
two context lengths) or takes a given one (`CostTable.from_mapping`, `CostTable.load`), and each round runs the
variant with the lowest interpolated cost for the rows now active (`CostTable.cheapest`); on a tie, the dense one.
So the sparse variant runs only where it was measured faster than the dense one.

A table as JSON (`CostTable.to_mapping`, `save`):

    {"occupancies": [1, 2, 4, 8], "contexts": [256, 1792],
     "seconds": {"dense":  [[...4 values at context 256...], [...at 1792...]],
                 "sparse": [[...], [...]]}}
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import statistics
import time
from typing import Any, Callable, Mapping, Sequence


def _interp(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
  """Piecewise-linear interpolation of ys over increasing xs, clamped to the end values outside them."""
  if x <= xs[0]:
    return ys[0]
  if x >= xs[-1]:
    return ys[-1]
  i = bisect.bisect_right(xs, x)
  w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
  return ys[i - 1] + w * (ys[i] - ys[i - 1])


def _increasing(name: str, xs: Sequence[int]) -> tuple[int, ...]:
  xs = tuple(xs)
  if not xs or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in xs) or list(xs) != sorted(set(xs)):
    raise ValueError(f"CostTable.{name} must be increasing integers >= 1, got {xs!r}")
  return xs


@dataclasses.dataclass(frozen=True)
class CostTable:
  """Seconds per decode step of each variant (`seconds[variant][context index][occupancy index]`), measured at
  `occupancies` active rows and `contexts` tokens per row."""

  occupancies: tuple[int, ...]
  contexts: tuple[int, ...]
  seconds: tuple[tuple[str, tuple[tuple[float, ...], ...]], ...]

  def __post_init__(self):
    _increasing("occupancies", self.occupancies)
    _increasing("contexts", self.contexts)
    if not self.seconds or "dense" not in dict(self.seconds):
      raise ValueError("a CostTable needs the dense variant's costs")
    for name, grid in self.seconds:
      ok = len(grid) == len(self.contexts) and all(len(row) == len(self.occupancies) for row in grid)
      if not ok or any(not isinstance(s, (int, float)) or not s >= 0 for row in grid for s in row):
        raise ValueError(f"CostTable: variant {name!r} needs {len(self.contexts)} x {len(self.occupancies)} "
                         "non-negative seconds (contexts x occupancies)")

  @property
  def variants(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.seconds)

  def cost(self, variant: str, rows: float, context: float | None = None) -> float:
    """Interpolated seconds per step of `variant` with `rows` active rows of `context` tokens (None: the middle of
    the measured contexts)."""
    grid = dict(self.seconds)[variant]
    by_context = [_interp(self.occupancies, row, rows) for row in grid]
    if context is None:
      context = (self.contexts[0] + self.contexts[-1]) / 2
    return _interp(self.contexts, by_context, context)

  def cheapest(self, rows: float, context: float | None = None, among: Sequence[str] | None = None) -> str:
    """The variant (of `among`, default all) with the lowest cost; ties go to "dense", then to the name."""
    names = [v for v in self.variants if among is None or v in among]
    return min(names, key=lambda v: (self.cost(v, rows, context), v != "dense", v))

  def to_mapping(self) -> dict[str, Any]:
    return {"occupancies": list(self.occupancies), "contexts": list(self.contexts),
            "seconds": {name: [list(row) for row in grid] for name, grid in self.seconds}}

  @classmethod
  def from_mapping(cls, m: Mapping[str, Any]) -> "CostTable":
    """The table from `to_mapping`'s form (a JSON object). ValueError names what is missing or malformed."""
    try:
      occupancies, contexts, seconds = m["occupancies"], m["contexts"], m["seconds"]
      grids = tuple((str(name), tuple(tuple(float(s) for s in row) for row in grid)) for name, grid in seconds.items())
      return cls(tuple(occupancies), tuple(contexts), grids)
    except (KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"a cost table needs 'occupancies', 'contexts' and 'seconds' {{variant: [[s, ...], ...]}}: "
                       f"{type(e).__name__}: {e}") from e

  @classmethod
  def load(cls, path: str | os.PathLike) -> "CostTable":
    with open(path, encoding="utf-8") as f:
      try:
        return cls.from_mapping(json.load(f))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON cost table: {e}") from e

  def save(self, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(self.to_mapping(), f, indent=1)


def occupancy_points(max_batch: int) -> tuple[int, ...]:
  """1, 2, 4, ... below `max_batch`, and `max_batch`."""
  points, r = [], 1
  while r < max_batch:
    points.append(r)
    r *= 2
  return tuple(points) + (max_batch,)


def context_points(max_len: int, steps: int) -> tuple[int, ...]:
  """Two context lengths to measure at, a short and a long one, leaving room for a round of `steps` tokens."""
  top = max(1, max_len - steps - 1)
  return tuple(sorted({max(1, min(top, max_len // 8)), top}))


def measure_table(run_round: Callable[[str, int, int], float], variants: Sequence[str], occupancies: Sequence[int],
                  contexts: Sequence[int], *, repeats: int = 3) -> CostTable:
  """Times every variant at every (context, occupancy): `run_round(variant, rows, context)` runs one decode round
  in that state and returns the seconds per step it measured; the median of `repeats` runs after an untimed one."""
  def median(v: str, rows: int, ctx: int) -> float:
    run_round(v, rows, ctx)
    return statistics.median(run_round(v, rows, ctx) for _ in range(repeats))

  grids = tuple((v, tuple(tuple(median(v, r, c) for r in occupancies) for c in contexts)) for v in variants)
  return CostTable(tuple(occupancies), tuple(contexts), grids)


def timed(fn: Callable[[], Any]) -> float:
  """Seconds `fn` takes, its result waited for (`jax.block_until_ready`)."""
  import jax
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0
