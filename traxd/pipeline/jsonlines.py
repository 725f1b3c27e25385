"""The child side of traxd's worker processes: JSON lines on a stdout of their own."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO


def protocol_stream() -> TextIO:
    """stdout for the protocol alone: stray prints of libraries go to stderr."""
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", buffering=1, encoding="utf-8")


def send(out: TextIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()
