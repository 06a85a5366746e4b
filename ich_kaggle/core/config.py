"""Experiments as data: one typed `Config` per YAML file in `ich_kaggle/configs/`.

The dataclasses below hold every default, once; a YAML file (the default recipe `seresnext50_512` included) lists
only what differs from them. Command-line overrides use dotted keys: `train.epochs=3`. Unknown keys, badly typed
values, names no registry knows and values outside a `Literal` field's choices are rejected with one line naming the
file and the key; names are checked against `core.registry`, which knows them without importing torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError, fix
from .registry import BACKBONES, LOSSES, OPTIMIZERS, POOLS, RECIPES, SCHEDULERS, STACK_MODELS, TTA, TTA_NEEDS, WINDOWS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
ENSEMBLE_DIR = CONFIG_DIR / "ensembles"  # configs whose `ensemble.members` list member configs
DEFAULT_CONFIG = "seresnext50_512"  # the config a command uses when none is named (the Makefile's CONFIG too)

# the closed choices of the config, each checked in one place (`_check_choices`, at load time)
DataSource = Literal["cache", "dicom"]  # cache (make preprocess first) | dicom (read each slice's DICOM; no cache)
FreezeMode = Literal["none", "backbone", "partial"]  # see models/backbones.py: freeze
Amp = Literal["bf16", "fp16", "none"]
ClassWeights = Literal["metric", "frequency", "balanced"]
Balance = Literal["none", "oversample"]
Split = Literal["patient", "random"]
TTAAverage = Literal["prob", "logit"]
EmbeddingSpace = Literal["per_fold", "mixture"]
Combine = Literal["mean", "logit"]


def _bad(src: str, key: str, value: Any, want: str) -> UserError:
    override = fix("--set", "EPOCHS=/BATCH=/LR=/SIZE=/SET_EXTRA=")
    return UserError(f"{src}: {key}={value!r} {want}; fix the config or the {override} override")


def _between(
    src: str, key: str, value: float, lo: float | None = None, hi: float | None = None, lo_open: bool = False
) -> None:
    """lo <= value <= hi (lo < value with lo_open), as one line naming the key."""
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        if hi is None:
            want = f"must be {'above' if lo_open else 'at least'} {lo:g}"
        elif lo is None:
            want = f"must be at most {hi:g}"
        else:
            want = f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise _bad(src, key, value, want)


def _probabilities(src: str, section: str, obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        _between(src, f"{section}.{name}", getattr(obj, name), 0.0, 1.0)


@dataclass
class DataConfig:
    windows: list[str] = field(default_factory=lambda: ["brain", "subdural", "soft_tissue"])  # see data/windows.py
    image_size: int = 512
    neighbors: int = 0  # 2.5D: also stack this many previous/next slices of the series (each in every window)
    crop_black_border: bool = True
    # the head crop: this fraction of the head's box added on each side; at 0.04 no TTA view cuts intracranial
    # tissue on any slice of the real mini set, at 0 `shift_back` does on 5.5 % (make bench --what tta-subtypes)
    crop_margin: float = 0.04
    crop_square: bool = True  # widen the head crop to a square (the resize keeps its aspect); false: stretched
    min_brain_fraction: float = 0.0  # drop near-empty training slices (fraction of pixels in 0..80 HU)
    num_workers: int = -1  # loader processes; -1: one per CPU this process may use
    source: DataSource = "cache"  # training images

    @property
    def in_channels(self) -> int:
        return len(self.windows) * (2 * self.neighbors + 1)

    def check(self, src: str) -> None:
        if not self.windows:
            raise _bad(src, "data.windows", self.windows, "must name at least one window")
        for name in self.windows:
            WINDOWS.check(name, "data.windows")
        _between(src, "data.image_size", self.image_size, 8)
        _between(src, "data.neighbors", self.neighbors, 0)
        _between(src, "data.min_brain_fraction", self.min_brain_fraction, 0.0, 1.0)
        _between(src, "data.crop_margin", self.crop_margin, 0.0, 0.5)
        _between(src, "data.num_workers", self.num_workers, -1)


@dataclass
class AugmentConfig:
    hflip: float = 0.5
    shift_scale_rotate: float = 0.5
    shift_limit: float = 0.0625
    scale_limit: float = 0.1
    rotate_limit: float = 15.0
    transpose: float = 0.0
    random_resized_crop: float = 0.0
    crop_scale: tuple[float, float] = (0.8, 1.0)
    brightness_contrast: float = 0.3
    blur: float = 0.0
    window_jitter: float = 0.0  # probability of shifting each window's center/width
    window_jitter_hu: float = 10.0

    def check(self, src: str) -> None:
        _probabilities(
            src,
            "augment",
            self,
            (
                "hflip",
                "shift_scale_rotate",
                "transpose",
                "random_resized_crop",
                "brightness_contrast",
                "blur",
                "window_jitter",
            ),
        )
        _between(src, "augment.shift_limit", self.shift_limit, 0.0, 1.0)
        _between(src, "augment.scale_limit", self.scale_limit, 0.0, 1.0)
        _between(src, "augment.rotate_limit", self.rotate_limit, 0.0, 180.0)
        _between(src, "augment.window_jitter_hu", self.window_jitter_hu, 0.0)
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise _bad(
                src, "augment.crop_scale", list(self.crop_scale), "must be [low, high] with 0 < low <= high <= 1"
            )


@dataclass
class ModelConfig:
    backbone: str = "se_resnext50_32x4d"  # a registered backbone, `tu-<timm model>`, `pm-<name>`; `a+b` ensembles
    pretrained: bool = True
    weights: str | None = None  # file or folder of ImageNet weights; default: $TORCH_HOME/checkpoints
    pool: str = "avg"  # see models/heads.py
    dropout: float = 0.2
    freeze: FreezeMode = "none"  # backbone: head + BatchNorm train; partial: last stage + head train

    def check(self, src: str) -> None:
        for member in self.backbone.split("+"):
            BACKBONES.check(member.strip(), "model.backbone")
        POOLS.check(self.pool, "model.pool")
        _between(src, "model.dropout", self.dropout, 0.0, 1.0)


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # see engine/optim.py
    momentum: float = 0.9
    nesterov: bool = False
    scheduler: str = "cosine"  # see engine/optim.py
    warmup_epochs: float = 0.2
    accum_steps: int = 1
    amp: Amp = "bf16"  # on CUDA the GPU's capability decides between bf16 and fp16
    channels_last: bool = True
    compile: bool = False
    loss: str = "bce"  # see engine/losses.py
    class_weights: ClassWeights = "metric"  # metric (any=2) | frequency | balanced (per-label 1/#pos, 1/#neg)
    focal_gamma: float = 2.0
    seed: int = 42
    max_images_per_epoch: int = 0  # 0 = all; >0 subsamples each epoch (tiny configs)
    progressive_sizes: list[int] = field(default_factory=list)  # image size per epoch, e.g. [64, 128, 224, 256]
    balance: Balance = "none"  # oversample: repeat positives of rare subtypes
    ema: float = 0.0  # decay per optimizer step of the weights' moving average (engine/ema.py); 0 = off

    def check(self, src: str) -> None:
        _between(src, "train.ema", self.ema, 0.0, 0.99999)
        for key in ("epochs", "batch_size", "accum_steps"):
            _between(src, f"train.{key}", getattr(self, key), 1)
        _between(src, "train.lr", self.lr, 0.0, lo_open=True)
        _between(src, "train.weight_decay", self.weight_decay, 0.0)
        _between(src, "train.momentum", self.momentum, 0.0, 1.0)
        _between(src, "train.warmup_epochs", self.warmup_epochs, 0.0)
        _between(src, "train.focal_gamma", self.focal_gamma, 0.0)
        _between(src, "train.max_images_per_epoch", self.max_images_per_epoch, 0)
        for size in self.progressive_sizes:
            _between(src, "train.progressive_sizes", size, 8)
        OPTIMIZERS.check(self.optimizer, "train.optimizer")
        SCHEDULERS.check(self.scheduler, "train.scheduler")
        LOSSES.check(self.loss, "train.loss")


@dataclass
class CVConfig:
    k: int = 5
    seed: int = 42
    folds: list[int] = field(default_factory=list)  # which folds to train/predict; empty = all
    split: Split = "patient"  # random puts a patient's slices in several folds: leaks; papers only)

    def check(self, src: str) -> None:
        _between(src, "cv.k", self.k, 2)
        for fold in self.folds:
            _between(src, "cv.folds", fold, 0, self.k - 1)


def selected_folds(cv: CVConfig, fold: int | str | None = None) -> list[int]:
    """The folds a stage works on: one fold, or 'all' / None = cv.folds (a subset) or every fold 0..k-1.

    The one place that answers "which folds"; a fold outside 0..k-1 or a word other than 'all' is one line."""
    if fold is None or str(fold).strip().lower() == "all":
        chosen = list(cv.folds) or list(range(cv.k))
    else:
        try:
            chosen = [int(str(fold).strip())]
        except ValueError:
            raise UserError(
                f"fold {fold!r} is neither a fold number nor 'all'; "
                f"use {fix(f'--fold 0..{cv.k - 1}', f'fold=0..{cv.k - 1}')} or all"
            ) from None
    bad = [f for f in chosen if not 0 <= f < cv.k]
    if bad:
        where = f"fold {bad[0]}" if len(chosen) == 1 else f"cv.folds has fold(s) {bad}, which"
        raise UserError(
            f"{where} does not exist with cv.k={cv.k}; use {fix(f'--fold 0..{cv.k - 1}', f'fold=0..{cv.k - 1}')} or all"
        )
    return chosen


@dataclass
class TTAConfig:
    transforms: list[str] = field(default_factory=lambda: ["identity", "hflip"])  # see predict/tta.py
    average: TTAAverage = "prob"
    batch_size: int = 64

    def check(self, src: str) -> None:
        for name in self.transforms:
            TTA.check(name, "tta.transforms")
        _between(src, "tta.batch_size", self.batch_size, 1)


@dataclass
class StackConfig:
    model: str = "gru"  # see stack/nets.py
    # one bidirectional GRU layer of 32 units at lr 4e-3 (below), at most 30 epochs: 3.4x less CPU per series-step
    # than the former 2 x 64 at 2e-3, 20 epochs, which made the second stage miss its CPU budget at competition
    # scale (issue 26). Stack-scale simulation at scale 0.25, OOF: per_fold 0.01308 -> 0.01139, probs 0.01485 ->
    # 0.01604 (the best stage improves); CPU 878 -> 329 s. Full scale: 993 CPU s, 2.26 GB, every net stopped by its
    # validation (docs/benchmarks.md)
    hidden: int = 32
    layers: int = 1
    dropout: float = 0.1
    use_embeddings: bool = False
    embedding_dim: int = 16  # first-stage embeddings are reduced to this many principal components per model
    # with use_embeddings: per_fold (one stacker per fold model, on its own held-out fold and its own test embeddings;
    # stack/pipeline.run_per_fold) | mixture (one stacker; OOF embeddings each from the fold model that did not see
    # the image, test embeddings the mean of the fold models, one PCA over both). Set by measurement:
    # `python -m ich_kaggle demo --set stack.embedding_space=<design> stack.seed=<s>` (full size, same first stage),
    # stacked + embeddings weighted log loss, test / OOF, stack.seed 42, 1, 2, 3:
    #   per_fold 0.17328 0.17285 0.17425 0.17454 (mean 0.17373) / 0.17942 0.18439 0.19539 0.18525 (mean 0.18611)
    #   mixture  0.18608 0.16170 0.17290 0.18473 (mean 0.17635) / 0.19481 0.20376 0.21767 0.29245 (mean 0.22717)
    # per_fold: lower mean test loss, ~14x smaller spread over seeds, lower OOF at every seed (what submit chooses by).
    embedding_space: EmbeddingSpace = "per_fold"
    # fit the embedding-level second stage (stack.embedding_space) too, beside the probability-level one, into
    # runs/<cfg>/stack_embeddings/; `submit` then chooses among the first stage, both stacks and their blend by OOF
    embedding_stage: bool = False
    neighbors_k: int = 2
    epochs: int = 30  # at most; training stops earlier on the inner validation split
    # per net, a cap on optimizer steps (0 = none). The former default 800 bound at competition scale (every fold
    # stopped at ~3 epochs with its validation loss still falling, issue 26); the early stop below decides now.
    max_steps: int = 0
    # per net, a wall-clock safety budget in seconds (0 = none): it only stops a run that is far slower than expected
    # (e.g. a machine shared by many jobs); at competition scale the early stop ends each net well before it
    # (docs/stacking.md, `make bench --what stack-scale`)
    max_seconds: float = 1800.0
    # torch threads of the stacker's process: one thread was 2.2x faster per step than two at load 2 (issue 26); the
    # GRU's small matrices do not parallelise, so more threads only contend with the other processes
    threads: int = 1
    val_fraction: float = 0.1  # share of each fold's training series held out to stop on (0 = train all epochs)
    patience: int = 3  # validations without improvement before stopping
    val_every: int = 0  # optimizer steps between validations (0 = once per epoch)
    lr: float = 4e-3
    batch_series: int = 64
    reverse_tta: bool = True
    seed: int = 42
    sources: list[str] = field(
        default_factory=list
    )  # first-stage prediction folders to stack; empty: this config's own

    def embedding_level(self) -> "StackConfig":
        """The settings of the embedding-level stage fitted beside this one (`embedding_stage`): the same, on
        embeddings. One place, so the stack stage that writes it and submit that checks its freshness agree."""
        return dataclasses.replace(self, use_embeddings=True, embedding_stage=False)

    def check(self, src: str) -> None:
        STACK_MODELS.check(self.model, "stack.model")
        for key in ("hidden", "layers", "embedding_dim", "neighbors_k", "epochs", "batch_series"):
            _between(src, f"stack.{key}", getattr(self, key), 1)
        _between(src, "stack.max_steps", self.max_steps, 0)
        _between(src, "stack.max_seconds", self.max_seconds, 0.0)
        _between(src, "stack.threads", self.threads, 1)
        _between(src, "stack.val_fraction", self.val_fraction, 0.0, 0.5)
        _between(src, "stack.patience", self.patience, 1)
        _between(src, "stack.val_every", self.val_every, 0)
        _between(src, "stack.dropout", self.dropout, 0.0, 1.0)
        _between(src, "stack.lr", self.lr, 0.0, lo_open=True)


@dataclass
class EnsembleConfig:
    """An ensemble is a config whose `ensemble.members` lists member configs (configs/ensembles/<name>.yaml).

    Each member trains and predicts in its own runs/<member>/; the ensemble's runs/<name>/predictions/ holds their
    combination (the first-stage ensemble) and runs/<name>/stack/ the second stage over every member's predictions.
    """

    members: list[str] = field(default_factory=list)  # shipped config names or YAML paths; empty: not an ensemble
    combine: Combine = "mean"  # mean (of probabilities) | logit (mean of logits)
    weights: list[float] = field(default_factory=list)  # one per member; empty = equal
    member_set: list[str] = field(default_factory=list)  # key=value overrides applied to every member
    # the members' experiment folders are runs/<run_prefix>.<member>/ (set by RUN= on the ensemble; empty: <member>)
    run_prefix: str = ""

    def check(self, src: str) -> None:
        if self.weights and len(self.weights) != len(self.members):
            raise _bad(src, "ensemble.weights", self.weights, f"must give one weight per member ({len(self.members)})")
        if self.weights and (min(self.weights) < 0 or sum(self.weights) <= 0):
            raise _bad(src, "ensemble.weights", self.weights, "must be non-negative with a positive sum")
        if len(set(self.members)) != len(self.members):
            raise _bad(src, "ensemble.members", self.members, "must not repeat a member")
        for item in self.member_set:
            if "=" not in item:
                raise _bad(src, "ensemble.member_set", item, "must be key=value overrides")


@dataclass
class MILConfig:
    """Set-based MIL (recipe.kind: mil, recipes/mil.py)."""

    bag_size: int = 0  # slices per scan-labelled bag (longer series are subsampled evenly; 0 = whole series)
    mil_weight: float = 1.0  # weight of CE(Y, max_i p_i)
    smooth_weight: float = 0.1  # weight of the smoothness constraint
    margin: float = 0.0  # the paper's triplet margin
    scan_only_fraction: float = 0.0  # share of training series whose slice labels are hidden (scan label only)

    def check(self, src: str) -> None:
        if self.bag_size < 0 or self.bag_size in (1, 2):
            raise _bad(src, "recipe.mil.bag_size", self.bag_size, "must be 0 (whole series) or at least 3")
        for key in ("mil_weight", "smooth_weight", "margin"):
            _between(src, f"recipe.mil.{key}", getattr(self, key), 0.0)
        if not 0.0 <= self.scan_only_fraction < 1.0:
            raise _bad(src, "recipe.mil.scan_only_fraction", self.scan_only_fraction, "must be in [0, 1)")


@dataclass
class RecipeConfig:
    kind: str = "standard"  # a paper's training mechanism (recipes/): standard | mil
    mil: MILConfig = field(default_factory=MILConfig)

    def check(self, src: str) -> None:
        RECIPES.check(self.kind, "recipe.kind")
        self.mil.check(src)


@dataclass
class Config:
    name: str = DEFAULT_CONFIG
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    tta: TTAConfig = field(default_factory=TTAConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)

    @property
    def is_ensemble(self) -> bool:
        return bool(self.ensemble.members)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def available() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def available_ensembles() -> list[str]:
    return sorted(p.stem for p in ENSEMBLE_DIR.glob("*.yaml"))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML or command-line value to the dataclass field's type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, (int, str)) or (isinstance(value, float) and value.is_integer()):
                number = int(value)
                if not -INT_LIMIT <= number < INT_LIMIT:
                    raise UserError(f"{where}: {value!r} is out of range (at most {INT_LIMIT - 1})")
                return number
        except (ValueError, OverflowError):
            pass
    elif tp is float:
        try:
            if not isinstance(value, bool):
                number = float(value)
                if not math.isfinite(number):
                    raise UserError(f"{where}: expected a finite number, got {value!r}")
                return number
        except (TypeError, ValueError, OverflowError):
            pass
    elif tp is str or origin is Literal:  # a Literal's choices are checked with the config (_check_choices)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if isinstance(value, (list, tuple)):
            if origin is tuple:
                return tuple(_coerce(v, a, where) for v, a in zip(value, args))
            return [_coerce(v, args[0], where) for v in value]
    elif origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if isinstance(value, dict):
            return dict(value)
    else:
        return value
    raise UserError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _set(obj: Any, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    target = obj
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(target)}
        if part not in names:
            raise UserError(
                f"{source}: unknown config key '{'.'.join(parts[: i + 1])}'; known keys here: {', '.join(names)}"
            )
        if i == len(parts) - 1:
            hints = typing.get_type_hints(type(target))
            if dataclasses.is_dataclass(hints[part]):
                raise UserError(
                    f"{source}: '{key}' is a section; set one of its keys, "
                    f"e.g. '{key}.{next(iter(dataclasses.fields(hints[part]))).name}'"
                )
            coerced = _coerce(value, hints[part], f"{source}: {key}")
            if part == "seed" and not 0 <= coerced < SEED_LIMIT:  # numpy and torch take seeds in [0, 2**32)
                raise UserError(f"{source}: {key}={value!r} is out of range; use a seed in [0, {SEED_LIMIT - 1}]")
            setattr(target, part, coerced)
        else:
            target = getattr(target, part)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resolve_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise UserError(f"config file {path} not found; shipped configs: {', '.join(available())}")
        return path
    path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        path = ENSEMBLE_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise UserError(
            f"unknown config '{name_or_path}'; shipped configs: {', '.join(available())}; ensembles: "
            f"{', '.join(available_ensembles())} (or give a .yaml path)"
        )
    return path


INT_LIMIT = 2**63  # an integer setting must fit in 64 bits
SEED_LIMIT = 2**32


def _check_members(cfg: Config, key: str, source: str) -> None:
    """`ensemble.members: []` written by the user is a mistake, not a single config (dumped configs have it empty)."""
    if key == "ensemble.members" and not cfg.ensemble.members:
        raise UserError(
            f"{source}: ensemble.members is empty; list the member configs, or drop the ensemble section "
            f"for a single config"
        )


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (a second `data:` would silently replace the
    first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise UserError(f"line {key_node.start_mark.line + 1}: key '{key}' is given twice; keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")


def named(cfg: Config, run: str | None) -> Config:
    """`cfg` as the experiment `run`: its folder runs/<run>/ and its submission file are named so, and an ensemble's
    members train in runs/<run>.<member>/. The default (None or the config's own name) changes nothing."""
    if not run or run == cfg.name:
        return cfg
    if not RUN_NAME.fullmatch(run) or run.endswith((".new", ".old")):
        raise UserError(
            f"RUN={run!r} (--run): a run name is one folder name of letters, digits and . _ + = - "
            f"(not ending in .new or .old), e.g. RUN={cfg.name}-lr3e-4"
        )
    out = dataclasses.replace(cfg, name=run)
    if out.is_ensemble:
        out.ensemble = dataclasses.replace(out.ensemble, run_prefix=run)
    return out


def load(
    name_or_path: str = DEFAULT_CONFIG, overrides: list[str] | dict[str, Any] | None = None, run: str | None = None
) -> Config:
    """Load a config by shipped name or YAML path, then apply `key=value` overrides; `run` names the experiment
    (default: the config's name, see `named`)."""
    path = resolve_path(name_or_path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UserError as e:
        raise UserError(f"{path}: {e}; fix the file") from None
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{path}: not a text file (a YAML config is UTF-8 text); give the .yaml config") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    cfg = Config(name=path.stem)
    for key, value in _flatten(raw).items():
        _set(cfg, key, value, str(path))
        if "name" not in raw:  # a resolved config (`dump`, with its name) lists no members for a single config
            _check_members(cfg, key, str(path))
    if isinstance(overrides, dict):
        overrides = [f"{k}={v}" for k, v in overrides.items()]
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like key=value, e.g. train.epochs=3")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), value.strip(), "command line")
        _check_members(cfg, key.strip(), "command line")
    validate(cfg)
    return named(cfg, run)


def validate(cfg: Config) -> None:
    """Every section checks its own knobs (ranges here, names against the registries), so a mistake fails at load
    time with one line instead of deep inside a run."""
    src = f"config '{cfg.name}'"
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            try:
                section.check(src)
                _check_choices(src, f.name, section)
            except UserError as e:
                msg = str(e)
                raise UserError(msg if msg.startswith(src) else f"{src}: {msg}") from None
    for name in cfg.tta.transforms:  # a view only helps if training showed the model such images
        unseen = [a for a in TTA_NEEDS.get(name, ()) if getattr(cfg.augment, a) <= 0]
        if unseen:
            raise UserError(
                f"{src}: tta.transforms has '{name}', a view the model never sees in training "
                f"({', '.join(f'augment.{a}=0' for a in unseen)}); set {unseen[0]} > 0 in augment or "
                f"drop '{name}'"
            )
    if cfg.stack.use_embeddings and cfg.stack.embedding_space == "per_fold" and cfg.cv.split == "random":
        raise UserError(
            f"{src}: stack.embedding_space=per_fold needs cv.split=patient (under a random split a fold "
            f"model's held-out images are scattered slices, not whole series); use stack.embedding_space=mixture"
        )


def _check_choices(src: str, prefix: str, section: Any) -> None:
    """Every `Literal` field of the section (and of its sub-sections) holds one of its choices."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, tp = getattr(section, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            _check_choices(src, f"{prefix}.{f.name}", value)
        elif typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
            raise _bad(src, f"{prefix}.{f.name}", value, f"is not one of {', '.join(typing.get_args(tp))}")


def dump(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config (what a run actually used) as YAML, atomically."""
    from .io import atomic_open

    data = cfg.to_dict()
    data["augment"]["crop_scale"] = list(data["augment"]["crop_scale"])
    with atomic_open(path) as f:
        yaml.safe_dump(data, f, sort_keys=False)


def recorded_defaults(data: dict[str, Any]) -> Config:
    """What the keys absent from a recorded config (`Config.to_dict()` of an older version) stand for: today's
    defaults, except for a knob whose behaviour before it existed was not its default."""
    cfg = Config(name=str(data.get("name", "unnamed")))
    if "crop_square" not in data.get("data", {"crop_square": None}):
        cfg.data.crop_square = False  # stored before the knob existed: trained on stretched crops, predict the same
    return cfg


def from_dict(data: dict[str, Any], source: str = "checkpoint") -> Config:
    """Rebuild a Config from `Config.to_dict()` (as stored in checkpoints and kernels)."""
    cfg = recorded_defaults(data)
    data = {k: v for k, v in data.items() if k != "name"}
    for key, value in _flatten(data).items():
        _set(cfg, key, value, source)
    validate(cfg)
    return cfg
