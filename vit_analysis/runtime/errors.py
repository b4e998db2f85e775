"""Expected failures: the one exception type the command line prints as a plain paragraph.

A `UserError` is a problem the user can fix without reading code: a bad option, a missing file,
a checkpoint or cache entry that does not fit, a workdir that cannot hold results, training that
diverged. Its message says what is wrong, where, and what to do. The command line prints it on
stderr without a traceback and exits non-zero; anything else is a bug and keeps its traceback.
`Problems` holds several at once (validation reports every problem it finds, one line each).
`Interrupted` is what SIGTERM (a preemption) raises, so that it ends a run the way Ctrl-C does.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from types import FrameType

from absl import logging

# Environment variable that brings the traceback of an expected failure back (debugging).
TRACEBACK_ENV = "VIT_ANALYSIS_TRACEBACK"
# Exit status of a run ended by a signal: 128 + its number, as a shell reports it.
EXIT_SIGINT, EXIT_SIGTERM, EXIT_USER_ERROR = 128 + signal.SIGINT, 128 + signal.SIGTERM, 1


class UserError(Exception):
  """A failure the user can fix; its message is one paragraph saying what to do."""


class Problems(UserError):
  """Several problems found together (validation): the message lists them one per line.

  Attributes:
    problems: one line each, what is wrong and what to do.
  """

  def __init__(self, problems: Sequence[str]):
    self.problems = [" ".join(str(p).split()) for p in problems]
    super().__init__(f"{len(self.problems)} problems, nothing was run or written:\n" +
                     "\n".join(f"  - {p}" for p in self.problems))


def raise_all(found: Sequence[BaseException]) -> None:
  """Raises the problems of a validation at once: none, the one (its type kept), or `Problems`.

  A single problem keeps its type (callers catch a KeyError for an unknown key); several become
  one `Problems` whose lines carry each one's context (e.g. "model 'vit': ").
  """
  unique: dict[str, BaseException] = {}  # e.g. one bad `train` key, seen by every model
  for e in found:
    if not hasattr(e, "_vit_analysis_context"):
      e._vit_analysis_context = ""  # pylint: disable=protected-access
    unique.setdefault(e._vit_analysis_context + message(e), e)  # pylint: disable=protected-access
  found = list(unique.values())
  if len(found) == 1:
    raise found[0]
  if found:
    raise Problems([e._vit_analysis_context + message(e)  # pylint: disable=protected-access
                    for e in found]) from found[0]


class Interrupted(KeyboardInterrupt):
  """SIGTERM: unwinds like Ctrl-C (same clean-up), remembering the signal for the exit status."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def raise_on_sigterm() -> None:
  """Makes SIGTERM raise `Interrupted` in the main thread (call from the main thread)."""

  def handler(signum: int, frame: FrameType | None) -> None:
    del frame
    raise Interrupted(signum)

  signal.signal(signal.SIGTERM, handler)


def message(e: BaseException) -> str:
  """The text of an exception as one paragraph (a KeyError's repr quotes are dropped); the
  lines of `Problems` are kept."""
  if isinstance(e, Problems):
    return str(e)
  text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
  return " ".join(str(text).split())


def exit_status(e: BaseException) -> int:
  """130 for Ctrl-C, 143 for SIGTERM, 1 for a UserError."""
  if isinstance(e, Interrupted):
    return 128 + e.signum
  return EXIT_SIGINT if isinstance(e, KeyboardInterrupt) else EXIT_USER_ERROR


def report(e: BaseException, text: str, with_traceback: bool) -> None:
  """Writes `text` (and, when asked, the traceback of `e` first) to stderr."""
  if with_traceback:
    traceback.print_exception(e, file=sys.stderr)
  print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def expected(*types: type[BaseException], context: str = "") -> Iterator[None]:
  """Marks exceptions of `types` raised inside as expected failures, keeping their type.

  Validation raises KeyError / ValueError / FileNotFoundError, which callers (and tests) catch
  by type; marking them lets the command line print them plainly while a ValueError from deep
  inside a computation (a bug) keeps its traceback. `context` (e.g. "model 'vit': ") prefixes
  the printed message.
  """
  try:
    yield
  except types as e:
    if not hasattr(e, "_vit_analysis_context"):
      e._vit_analysis_context = context  # pylint: disable=protected-access
    raise


def is_expected(e: BaseException) -> bool:
  """Whether `e` is a `UserError` or was marked by `expected`."""
  return isinstance(e, UserError) or hasattr(e, "_vit_analysis_context")


def plain_ending(e: BaseException, stage: str, with_traceback: bool) -> int | None:
  """Prints an expected failure or an interrupt as one paragraph; returns its exit status.

  Returns None (print nothing) for anything else: a bug, which keeps its traceback.
  """
  if isinstance(e, KeyboardInterrupt):
    text = f"interrupted at {stage}; rerun the same command to resume"
  elif is_expected(e):
    text = "error: " + getattr(e, "_vit_analysis_context", "") + message(e)
  else:
    return None
  report(e, text, with_traceback)
  return exit_status(e)


def with_traceback(argv: list[str] | None = None) -> bool:
  """Whether expected failures print their traceback: VIT_ANALYSIS_TRACEBACK=1 or --verbosity≥1.

  Args:
    argv: the command line, when absl has not parsed it yet (a flag-parsing error).
  """
  if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
    return True
  if argv is None:
    return logging.get_verbosity() >= 1
  verbosity = 0
  for arg in argv[1:]:
    match = re.fullmatch(r"--?v(?:erbosity)?=(-?\d+)", arg)
    verbosity = int(match.group(1)) if match else verbosity
  return verbosity >= 1
