"""The CLI's commands: each declares its flags and its handler together (as transformers' `commands/`).

A command module registers its commands with `@command(name, help, *flags)`. Flags are small functions that add
arguments to a parser; the groups several commands share (`DATA`, `EXPERIMENT`, `KAGGLE`, ...) are defined once here.
Handlers import their stage lazily, so parsing (and every argument error) never imports torch.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable

from ..core.config import DEFAULT_CONFIG

Flags = Callable[[argparse.ArgumentParser], None]
Handler = Callable[[argparse.Namespace], "int | None"]

DEFAULT_DATA = "data/rsna-intracranial-hemorrhage-detection"  # the Makefile's DATA_DIR and the README's unzip target


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    flags: tuple[Flags, ...]
    run: Handler

    def add_to(self, sub: argparse._SubParsersAction) -> None:
        parser = sub.add_parser(self.name, help=self.help, description=self.help)
        for add in self.flags:
            add(parser)
        parser.set_defaults(handler=self.run)


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, *flags: Flags) -> Callable[[Handler], Handler]:
    """Declare a command: its name, one line of help, its flags; the decorated function is its handler."""

    def deco(run: Handler) -> Handler:
        if name in COMMANDS:
            raise ValueError(f"command {name!r} is declared twice")
        COMMANDS[name] = Command(name, help, flags, run)
        return run

    return deco


def flag(*names: str, **kwargs) -> Flags:
    """One `add_argument` call, kept as data until the parser is built."""
    return lambda parser: parser.add_argument(*names, **kwargs)


def group(*flags: Flags) -> Flags:
    """Several flags used together, added as one."""

    def add(parser: argparse.ArgumentParser) -> None:
        for add_flag in flags:
            add_flag(parser)

    return add


def defaults(**values) -> Flags:
    return lambda parser: parser.set_defaults(**values)


# --- flag groups shared by several commands (each written once) ---
DATA = group(
    flag("--data", default=os.environ.get("DATA_DIR", DEFAULT_DATA), help="competition folder in the Kaggle layout"),
    flag("--work", default=None, help="folder for derived files (default: work/<data folder name>-<hash of its path>)"),
)
CONFIG = flag("--config", default=DEFAULT_CONFIG, help="shipped config or ensemble name, or path to a YAML file")
RUNS = flag("--runs", default="runs", help="experiments are written to RUNS/<run>/")
RUN = flag(
    "--run",
    default=None,
    help="the experiment's folder name under RUNS (default: the config's name); a changed setting with a new "
    "--run trains beside the old experiment",
)
SET = flag(
    "--set",
    nargs="*",
    action="extend",
    default=[],
    metavar="KEY=VALUE",
    help="override config keys, e.g. train.epochs=3 (repeatable; applied in order)",
)
EXPERIMENT = group(DATA, CONFIG, RUNS, RUN, SET)
USERNAME = flag(
    "--username", default=os.environ.get("KAGGLE_USERNAME"), help="Kaggle user name (default: $KAGGLE_USERNAME)"
)
KERNELS_OUT = flag("--out", default="kernels", help="folder of the dataset and kernel folders")
KAGGLE_OUT = group(KERNELS_OUT, USERNAME)
SLUG = flag("--slug", default=None, help="kernel slug (default ich-kaggle-<config>)")
KAGGLE = group(CONFIG, KAGGLE_OUT, SLUG, defaults(set=[]))  # what names the datasets and the kernel
PUSH = flag("--push", action="store_true", help="push the kernel to Kaggle once written")
RESUME = flag("--resume", action="store_true", help="attach this kernel's previous output and resume from it")
MINI = flag("--mini", default=None, help="extracted real mini set (default: from ../shared)")
WORKERS = flag("--workers", type=int, default=os.cpu_count())


# --- what most handlers resolve first (one place each) ---
def layout_of(args: argparse.Namespace):
    from ..core.layout import Layout

    return Layout.of(args.data, getattr(args, "work", None))


def config_of(args: argparse.Namespace):
    from ..core import config

    return config.load(args.config, args.set, run=getattr(args, "run", None))


def members_of(args: argparse.Namespace, cfg):
    """An ensemble's member configs (with the same --set overrides), or [cfg] for a single config."""
    from ..core import ensemble

    return ensemble.load_members(cfg, args.set) if cfg.is_ensemble else [cfg]


def kaggle_names(args: argparse.Namespace):
    """Only the config's name matters here (the file is not read)."""
    from ..core import config
    from ..kaggle import build as kernel

    return kernel.names_for(config.Config(name=config.resolve_path(args.config).stem), args.username, args.slug)
