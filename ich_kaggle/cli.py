"""ich_kaggle: RSNA intracranial hemorrhage detection, from the DICOMs to a scored Kaggle submission.

A table of commands: each declares its flags and handler in `ich_kaggle/commands/` and calls one stage. Parsing
imports no stage, so argument errors answer at once.
"""

from __future__ import annotations

import argparse
import errno
import sys

from .commands import COMMANDS

# each module registers its commands; imported in pipeline order, the order `--help` lists them
from .commands import data, train, predict, report, pipeline, apply, serve, kaggle, docs  # noqa: F401, I001
from .core.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ich_kaggle",
        description=__doc__.splitlines()[0],
        epilog="`make help` lists the same steps as Make targets and variables; "
        "`python -m ich_kaggle <command> --help` gives a command's flags.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        cmd.add_to(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .core import interrupt, log, scope

    log.show()  # the library logs; here its messages become plain lines
    previous = interrupt.install()
    try:
        with scope.command_scope():  # the DICOM listing, meta.csv and the folds resolved once per command
            code = int(args.handler(args) or 0)
        interrupt.check()  # a signal whose KeyboardInterrupt was swallowed still stops the run non-zero
        return code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full or a read-only folder, wherever it happens: one line (writes are atomic)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        from .core.io import cannot_write

        print(f"error: {cannot_write(e.filename or '(a file)', e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 128 + (interrupt.received() or 2)
    finally:
        interrupt.restore(previous)
