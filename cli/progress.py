"""Progress on stderr for long reads: a live counter on a terminal, a line per tenth otherwise."""

from __future__ import annotations

import sys
from typing import Callable


def stderr_progress(label: str) -> Callable[[int, int, str], None]:
    """A progress(i, n, name) callback printing `label i/n` to stderr (logs stay short off a terminal)."""

    def progress(i: int, n: int, name: str) -> None:
        if sys.stderr.isatty():
            end = "\n" if i == n else ""
            sys.stderr.write(f"\r{label} {i}/{n} {name[:40]:<40}{end}")
        elif n and (i == n or i % max(1, n // 10) == 0):
            sys.stderr.write(f"{label} {i}/{n}\n")
        sys.stderr.flush()

    return progress
