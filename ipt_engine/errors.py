"""Exception and warning types raised by ipt_engine.

Every error a user can cause has its own type and a message that says what is wrong and what to do, so
that callers (the CLI, the service) can map them to clear responses without parsing strings.
"""

from __future__ import annotations


class IPTError(Exception):
    """Base class of all ipt_engine errors."""


class InvalidTaskError(IPTError, ValueError):
    """A task cannot be used as given: too few examples, missing options, unknown kind, bad split."""


class IncompatibleArtifactError(IPTError, ValueError):
    """A subspace artifact was trained for a different backbone or prompt shape than the one it meets."""


class NonFiniteLossError(IPTError, FloatingPointError):
    """Training produced a NaN or infinite loss; training stops instead of silently corrupting weights."""


class BackboneLoadError(IPTError, RuntimeError):
    """The backbone model or its tokenizer could not be located or loaded."""


class DataUnavailableError(IPTError, RuntimeError):
    """The task data (the BIG-bench sdist) could not be fetched; the message says what pip answered."""


class InputTruncatedWarning(UserWarning):
    """An input was longer than the model's context and was cut from the left."""
