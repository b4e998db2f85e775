"""The one progress line: done/total, steady-state rate and ETA, through absl logging at INFO.

The first `update` closes the "first batch", which on an accelerator includes compiling the
step; rates and ETAs count only what comes after it, so a 40 s compile does not make a 2,000
images/s run look like 200 images/s. Nothing is printed except through `absl.logging.info`, so
`--verbosity` (absl) is the only switch.

`at(text)` records where the current stream is ("cka_intra/vit repeat 2/3, step 3/4"), so that an
interrupted run can say where it stopped (`main`: "interrupted at <analysis, repeat, step>").
"""
from __future__ import annotations

import time
from collections.abc import Callable

from absl import logging

LOG_EVERY_S = 10.0
_WHERE = [""]  # the position `at` last recorded


def at(where: str) -> None:
  """Records where the running loop is (e.g. "probe/vit features, step 3/8"); '' for nowhere."""
  _WHERE[0] = where


def where() -> str:
  """What `at` last recorded ('' when nothing is running)."""
  return _WHERE[0]


class Progress:
  """Counts work done and logs `desc: done/total unit, rate, ETA` every `every_s` seconds.

  Args:
    total: the amount of work expected (e.g. images); 0 if unknown.
    desc: what is being done, first on the line.
    unit: what `update` counts.
    initial: work already done before this run (a resumed stream); counted in `done` but not in
      the rate.
    every_s: seconds between log lines.
    clock: seconds as a float (injectable for tests).
  """

  def __init__(self, total: float, desc: str = "", unit: str = "images", *, initial: float = 0,
               every_s: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic):
    self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
    self._clock = clock
    self.start = self._last_log = clock()
    self.initial = self.done = initial
    self._first_done: float | None = None  # done after the first (compiling) update
    self._first_time: float | None = None
    self._closed: dict[str, float] | None = None

  def rate(self) -> float:
    """Units per second after the first update (or since the start while there is only one)."""
    now = self._clock()
    if self._first_time is not None and self.done > self._first_done and now > self._first_time:
      return (self.done - self._first_done) / (now - self._first_time)
    return (self.done - self.initial) / max(now - self.start, 1e-9)

  def line(self) -> str:
    """The progress line as logged."""
    rate = self.rate()
    text = f"{self.desc}: {self.done:.0f}"
    if self.total:
      text += f"/{self.total:.0f}"
    text += f" {self.unit}, {rate:.1f} {self.unit}/s"
    if self.total and rate > 0:
      text += f", ETA {max(self.total - self.done, 0) / rate:.0f} s"
    return text

  def update(self, n: float) -> None:
    """Adds `n` units of work done; logs when `every_s` has passed since the last line."""
    self.done += n
    now = self._clock()
    if self._first_time is None:
      self._first_time, self._first_done = now, self.done
    if now - self._last_log >= self.every_s:
      self._last_log = now
      logging.info("%s", self.line())

  def close(self) -> dict[str, float]:
    """Logs the final line once and returns the run's statistics.

    Returns:
      {'num_images': done (incl. `initial`), 'seconds': since construction, 'examples_per_s':
      steady-state rate (after the first update), 'first_batch_seconds': construction to the
      first update (compilation included)}.
    """
    if self._closed is None:
      now = self._clock()
      first = (self._first_time if self._first_time is not None else now) - self.start
      self._closed = {"num_images": float(self.done), "seconds": now - self.start,
                      "examples_per_s": self.rate(), "first_batch_seconds": first}
      logging.info("%s: %.0f %s in %.1f s (first batch incl. compilation %.1f s; then %.1f "
                   "%s/s)", self.desc, self.done, self.unit, self._closed["seconds"], first,
                   self._closed["examples_per_s"], self.unit)
    return dict(self._closed)
