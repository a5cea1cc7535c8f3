"""The ``featcache`` command line: a thin layer over the library.

``main`` turns the errors users can fix into one line on stderr and exit
status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ..errors import FeatcacheError  # noqa: E402
from . import cache_cmd, features_cmd  # noqa: E402,F401
from .app import app  # noqa: E402

for _optional in ("head_cmd", "finetune_cmd", "bench_cmd"):
    try:
        __import__(f"{__name__}.{_optional}")
    except ModuleNotFoundError as _exc:  # a stage not built yet
        if _optional not in str(_exc):
            raise

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except FeatcacheError as exc:
        print(f"featcache: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("featcache: interrupted; finished chunks are kept, rerun the same command to resume.", file=sys.stderr)
        sys.exit(130)
