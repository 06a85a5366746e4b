"""The README's demo block: written from, and checked against, what the last default `make demo` printed."""

from __future__ import annotations

import sys
from pathlib import Path

from . import command, flag

README = flag("--readme", default=None, help="default: the project's README.md")
OUTPUT = flag("--demo-output", default=None, help="default: demo.txt of the default `make demo`'s run")


def _paths(args) -> tuple[Path, Path]:
    from .. import demo, docs

    return Path(args.readme or docs.README), Path(args.demo_output or demo.default_output())


@command("docs", "write the last `make demo` output into the README's demo block", README, OUTPUT)
def write_docs(args):
    from .. import docs

    readme, output = _paths(args)
    print(f"{readme}: demo block {'updated' if docs.update(readme, output) else 'already current'} from {output}")


@command("docs-check", "exit 1 where the README's demo block is not what the last `make demo` printed", README, OUTPUT)
def docs_check(args):
    from .. import docs

    readme, output = _paths(args)
    problem = docs.check(readme, output)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    print(f"{readme}: the demo block is the last `make demo` output ({output})")
    return 0
