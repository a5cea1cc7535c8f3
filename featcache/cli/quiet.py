"""Keep TensorFlow's C++ start-up lines off the terminal; featcache's own output stays.

TensorFlow, absl and LiteRT write from C++ straight to file descriptor 2, and
``TF_CPP_MIN_LOG_LEVEL`` does not reach all of it: with TF 2.21 set to 2 or 3,
the lines absl prints before it is initialised (``WARNING: All log messages
before absl::InitializeLog() ...``, the oneDNN notice, CUDA probing) and
LiteRT's ``INFO: Created TensorFlow Lite XNNPACK delegate`` still appear.

So, unless the user asks for them (``--verbose`` anywhere on the command line,
or ``TF_CPP_MIN_LOG_LEVEL`` set in the environment by the user), file
descriptor 2 becomes a pipe read by a thread that drops the lines in
TensorFlow's log formats and passes every other line on, while Python's own
``sys.stderr`` (featcache's messages, progress bars, warnings) writes to the
terminal directly.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from dataclasses import dataclass, field
from typing import Mapping, MutableMapping, Optional, Sequence

# Lines written by TensorFlow's C++ runtime, absl, the TFLite converter and LiteRT.
NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ ]+:\d+\]"
    rb"|To enable the following instructions: .* rebuild TensorFlow"
    rb"|INFO: (Created TensorFlow Lite|Initialized TensorFlow Lite|TfLite)"
    rb"|fully_quantize: \d, inference_type: )")
VERBOSE_FLAGS = ("--verbose", "-v")


def wants_tensorflow_lines(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """True when the user asked to see TensorFlow's own lines."""
    return any(arg in VERBOSE_FLAGS for arg in argv) or "TF_CPP_MIN_LOG_LEVEL" in environ


def is_noise(line: bytes) -> bool:
    return bool(NOISE.match(line.lstrip(b"\r")))


@dataclass
class QuietStderr:
    """File descriptor 2 through a filter; ``stop`` restores it and passes on what is left."""

    terminal: int
    reader: int
    python_stderr: object
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._pump, name="featcache-quiet-stderr", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self.reader, 65536)
            except OSError:
                break
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            self._write([line + b"\n" for line in lines])
        if pending:
            self._write([pending])
        os.close(self.reader)

    def _write(self, lines: list) -> None:
        kept = b"".join(line for line in lines if not is_noise(line))
        if kept:
            try:
                os.write(self.terminal, kept)
            except OSError:
                pass

    def stop(self) -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.terminal, 2)  # closes the pipe's last write end (unless a child process still holds it)
        self.thread.join(timeout=2)
        sys.stderr = self.python_stderr


def quiet_stderr(argv: Sequence[str], environ: MutableMapping[str, str] = os.environ) -> Optional[QuietStderr]:
    """Start filtering TensorFlow's lines unless the user asked for them; None when nothing was changed."""
    if wants_tensorflow_lines(argv, environ):
        return None
    environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # what absl reads once initialised
    try:
        terminal = os.dup(2)
        reader, writer = os.pipe()
        os.dup2(writer, 2)
        os.close(writer)
    except OSError:
        return None
    original = sys.stderr
    encoding = getattr(original, "encoding", None) or "utf-8"
    sys.stderr = open(terminal, "w", buffering=1, encoding=encoding, errors="backslashreplace", closefd=False)
    return QuietStderr(terminal, reader, original)
