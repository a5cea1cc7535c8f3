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


def brief(exc: BaseException, limit: int = 300) -> str:
    """Another library's error message as one line, cut only between sentences.

    Keras and TensorFlow spread a message over many lines, often breaking a sentence;
    the CLI prints one line, so the lines are joined and, past ``limit``, whole
    sentences are kept (a single sentence that is too long ends in an ellipsis).
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = max(head.rfind(". "), head.rfind(": "), head.rfind("; "))
    if end >= limit // 3:
        return head[:end + 1]
    return head.rstrip() + "…"
