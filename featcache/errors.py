"""Errors that the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations


class FeatcacheError(Exception):
    """A problem the user can fix: bad input, missing file, stale cache.

    The CLI prints ``str(error)`` on one line and exits with status 1, so the
    message must name the problem and, where there is one, the fix.
    """


class InvalidArgument(FeatcacheError, ValueError):
    """A bad argument value; also a ``ValueError`` as in ``keras.applications``."""


def choice_error(what: str, allowed, received) -> InvalidArgument:
    """The Keras-style error: name what was allowed and what was received."""
    allowed_list = ", ".join(repr(a) for a in allowed)
    return InvalidArgument(f"Unknown {what} {received!r}; expected one of: {allowed_list}.")
