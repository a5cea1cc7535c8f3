"""The ``featcache`` command line: a thin layer over the library.

``main`` turns the errors users can fix into one line on stderr and exit
status 1; anything else is a bug and keeps its traceback. It also keeps
TensorFlow's C++ start-up lines off the terminal unless asked (``cli.quiet``).
"""

from __future__ import annotations

import sys

from ..errors import FeatcacheError  # noqa: E402
# Importing a command module registers its commands; --help lists them in this order.
from . import features_cmd  # noqa: E402,F401,I001
from . import head_cmd  # noqa: E402,F401
from . import finetune_cmd  # noqa: E402,F401
from . import export_cmd  # noqa: E402,F401
from . import cache_cmd  # noqa: E402,F401
from .app import app  # noqa: E402

__all__ = ["app", "main"]


# What an interrupted command leaves behind, and how to go on; one line each.
_INTERRUPTED = {
    "features": "finished chunks are kept beside the cache file (<name>.h5.parts); rerun the same command to resume.",
    "head": "no run was recorded (a run folder appears only once complete); rerun the command to train again.",
    "finetune": "the last finished epoch is kept in the run's work folder; rerun the same command to resume from it.",
    "clean": "what was removed is gone, the rest is untouched; rerun `featcache clean` to finish.",
}


class Interrupted(BaseException):
    """Ctrl-C, raised in place of ``KeyboardInterrupt``, which typer would swallow into a silent exit 130."""


def _on_sigint(signum, frame) -> None:
    raise Interrupted()


def _interrupted_line(argv: list[str]) -> str:
    command = next((a for a in argv if not a.startswith("-")), "")
    what = _INTERRUPTED.get(command, "nothing was left half-written.")
    return f"featcache: interrupted{' ' + command if command else ''}: {what}"


def main() -> None:
    from .quiet import quiet_stderr

    quiet = quiet_stderr(sys.argv[1:])  # before anything imports TensorFlow
    try:
        _main()
    finally:
        if quiet is not None:
            quiet.stop()


def _main() -> None:
    import signal

    signal.signal(signal.SIGINT, _on_sigint)
    try:
        code = app(standalone_mode=False)  # usage errors come back here, to be said in one line
    except FeatcacheError as exc:
        print(f"featcache: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except (Interrupted, KeyboardInterrupt):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the message short
        print(_interrupted_line(sys.argv[1:]), file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if not _is_usage_error(exc):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `featcache` or `featcache cache`: the help
            exc.show()
        else:
            print(_usage_line(exc, sys.argv[1:]), file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    if isinstance(code, int) and code:
        sys.exit(code)


def _is_usage_error(exc: BaseException) -> bool:
    """Click's own errors (unknown option, missing argument, bad type), found without importing click's internals."""
    return any(cls.__name__ == "ClickException" for cls in type(exc).__mro__)


def _usage_line(exc, argv: list[str]) -> str:
    words = [a for a in argv[:2] if not a.startswith("-")]
    command = " ".join(words[:2] if words[:1] == ["cache"] else words[:1])
    message = " ".join(str(exc.format_message()).split()).rstrip(".")
    return f"featcache: error: {message} (see `featcache {command + ' ' if command else ''}--help`)."
