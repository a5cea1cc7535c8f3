"""The ``featcache`` command line: a thin layer over the library.

``main`` turns the errors users can fix into one line on stderr and exit
status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ..errors import FeatcacheError  # noqa: E402
# Importing a command module registers its commands; --help lists them in this order.
from . import features_cmd  # noqa: E402,F401,I001
from . import head_cmd  # noqa: E402,F401
from . import finetune_cmd  # noqa: E402,F401
from . import cache_cmd  # noqa: E402,F401
from .app import app  # noqa: E402

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
