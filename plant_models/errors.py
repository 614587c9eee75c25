"""Typed errors of hmpc. Every package error derives from :class:`HmpcError` and from the
matching built-in, so callers may catch either."""

from __future__ import annotations


class HmpcError(Exception):
    """Base class of every error raised by hmpc."""


class ConfigError(HmpcError, ValueError):
    """A configuration or parameter file (or option) is invalid.

    The message names the file, the key and what is allowed.
    """


class ModelError(HmpcError, ValueError):
    """A model was called with inputs of the wrong shape or meaning."""


class IntegrationError(HmpcError, RuntimeError):
    """A numerical integration of the plant failed."""


class FitError(HmpcError, RuntimeError):
    """Fitting a residual model failed; the model was rolled back to its previous state."""


class SolverFailedError(HmpcError, RuntimeError):
    """A numerical optimiser did not return a usable solution.

    Attributes:
        status: the solver's return status string.
    """

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


class PlantIOError(HmpcError, ConnectionError):
    """Communication with the plant (or its simulator) failed."""


class HistorianError(HmpcError, OSError):
    """The historian (or audit trail) could not store or read records; nothing was written
    by the failed call. The message names the database and what to do next."""
