"""The exception tree of rlm-graph.

Every error the library raises on purpose derives from :class:`RlmGraphError`.
Two families sit below it:

- caller mistakes: :class:`ConfigError` and :class:`SourceError` (also
  ``ValueError``), raised before any model call is paid for;
- run failures: :class:`ModelCallError` (and its :class:`ContextWindowError`),
  :class:`BudgetExceeded` and :class:`StoreError`.

Each message says what happened, names the offending value, and says what to do.
"""

from __future__ import annotations

__all__ = [
    "BudgetExceeded",
    "ConfigError",
    "ContextWindowError",
    "ModelCallError",
    "ResumeMismatchError",
    "RlmGraphError",
    "RunBusyError",
    "SourceError",
    "StoreError",
]


class RlmGraphError(Exception):
    """Root of every error rlm-graph raises on purpose."""


class ConfigError(RlmGraphError, ValueError):
    """The configuration cannot work: an unknown model, a window too small, ..."""


class SourceError(RlmGraphError, ValueError):
    """A source cannot be read: missing, empty, binary or badly encoded."""


class ModelCallError(RlmGraphError):
    """A model call failed after its retries and fallbacks."""

    def __init__(
        self, message: str, *, retryable: bool = False, systemic: bool = False
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        """Whether trying the same call later might succeed."""
        self.systemic = systemic
        """Whether every other call would fail the same way (bad key, unknown
        model): the run stops instead of marking one task failed."""


class ContextWindowError(ModelCallError):
    """The prompt did not fit the model's context window."""


class BudgetExceeded(RlmGraphError):
    """A run reached one of its limits (calls, tokens, cost or time)."""


class StoreError(RlmGraphError):
    """The run store cannot be opened, read or written."""


class RunBusyError(StoreError):
    """Another process is driving this run right now."""


class ResumeMismatchError(StoreError):
    """A resume was asked with a source, question or configuration that differs
    from the run's own."""
