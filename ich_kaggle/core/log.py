"""The library logs (`logging.getLogger(__name__)` in every module); the CLI shows those messages as plain lines.

The one console handler of the package: `show()` is what `cli.main` (and the Kaggle kernels) call: INFO and above
of every `ich_kaggle.*` logger go to stdout as the message alone, through tqdm so a running progress bar is not
broken, and to whatever `sys.stdout` is at that moment (so pytest's capture sees them too).
"""

from __future__ import annotations

import logging
import sys

ROOT = "ich_kaggle"


class _Plain(logging.Handler):
    """The message alone, on the current sys.stdout, without breaking an active tqdm bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # a message must never sink a run
            self.handleError(record)


def show(level: int = logging.INFO) -> None:
    """Print the library's messages (idempotent)."""
    root = logging.getLogger(ROOT)
    root.setLevel(level)
    if not any(isinstance(h, _Plain) for h in root.handlers):
        handler = _Plain()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
