"""The error hierarchy. Each class says what happened and what the CLI does with it.

    HotmergeError          the base: every error hotmerge raises on purpose
      ConfigError          bad input found before any work starts      exit 2, one line
      SetupError           an engine could not start, or the write     exit 1, one line that
                           proof failed                                names the flag to try
      CandidateError       one candidate failed (its merge is not      scored worst; the
                           finite, its model evaluates to NaN)         search goes on
      RunFailed            a run that started but cannot go on or      exit 1, one line
                           produce a result

Any other exception raised while a candidate is evaluated is a bug: the worker
records it with its traceback, the run directory keeps it (`errors/`), and a few
in a row on one rank stop the run with its state saved (search/coordinator.py).

`hotmerge.cli.main` maps these classes to exit codes in one table; with
HOTMERGE_DEBUG=1 it prints the traceback too.
"""

from __future__ import annotations

# What a failed evaluation's history record says about it (record["failure"]).
CANDIDATE = "candidate"
BUG = "bug"


class HotmergeError(Exception):
    """Base of every error hotmerge raises on purpose. The message is one line."""

    def __init__(self, message: str):
        # Keep the one-line promise even when a caller passes multi-line text.
        super().__init__(" ".join(str(message).split()))


class ConfigError(HotmergeError):
    """A problem in the user's configuration or inputs, found before any work starts.

    The message is a single line that names the problem and the fix.
    """


class SetupError(HotmergeError):
    """An engine that could not start, or a runtime that cannot prove its writes are seen.

    The message names the flag to try (for example --no-vllm or --device cpu).
    """


class CandidateError(HotmergeError):
    """One candidate failed in a way that says something about the candidate, not the code.

    The search records it, scores the candidate worst, and goes on.
    """


class RunFailed(HotmergeError):
    """A run that started but could not go on or produce a result (exit code 1, one line)."""


class BugsInARow(RunFailed):
    """The same rank raised unexpected exceptions (bugs) for several candidates in a row.

    The run stopped with its state saved; `traceback_file` holds the last traceback.
    """

    def __init__(self, message: str, traceback_file=None):
        super().__init__(message)
        self.traceback_file = traceback_file


def candidate_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that are candidate errors, wherever they are raised.

    The merge kernels raise their own NonFiniteMergeError and UndefinedMergeError (both
    ValueErrors): they say the candidate is bad, not that the code is.
    """
    from hotmerge.kernels import NonFiniteMergeError, UndefinedMergeError

    return (CandidateError, NonFiniteMergeError, UndefinedMergeError)
