"""Experiments as data: one typed `Config` per YAML file in `ich_kaggle/configs/`.

A YAML file only lists what differs from the defaults below (the defaults are the proven
`seresnext50_512` recipe). Command-line overrides use dotted keys: `train.epochs=3`.
Unknown keys and badly typed values are rejected with one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"

# (center, width) in Hounsfield units.
WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "soft_tissue": (40.0, 380.0),
    "bone": (600.0, 2800.0),
}


@dataclass
class DataConfig:
    windows: list[str] = field(default_factory=lambda: ["brain", "subdural", "soft_tissue"])
    image_size: int = 512
    neighbors: int = 0  # 2.5D: also stack this many previous/next slices of the series (each in every window)
    crop_black_border: bool = True
    min_brain_fraction: float = 0.0  # drop near-empty training slices (fraction of pixels in 0..80 HU)
    num_workers: int = 8

    @property
    def in_channels(self) -> int:
        return len(self.windows) * (2 * self.neighbors + 1)


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


@dataclass
class ModelConfig:
    backbone: str = "se_resnext50_32x4d"
    pretrained: bool = True
    weights: str | None = None  # file or folder of ImageNet weights; default: $TORCH_HOME/checkpoints
    pool: str = "avg"  # avg | gem | avgmax
    dropout: float = 0.2
    freeze: str = "none"  # none | backbone (head + BatchNorm train) | partial (last stage + head train)


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | adam | sgd
    momentum: float = 0.9
    nesterov: bool = False
    scheduler: str = "cosine"  # cosine | onecycle | constant
    warmup_epochs: float = 0.2
    accum_steps: int = 1
    amp: str = "bf16"  # bf16 | fp16 | none
    channels_last: bool = True
    compile: bool = False
    loss: str = "bce"  # bce | focal
    class_weights: str = "metric"  # metric (any=2) | frequency | balanced (per-label 1/#pos, 1/#neg)
    focal_gamma: float = 2.0
    seed: int = 42
    max_images_per_epoch: int = 0  # 0 = all; >0 subsamples each epoch (tiny configs)
    progressive_sizes: list[int] = field(default_factory=list)  # image size per epoch, e.g. [64, 128, 224, 256]
    balance: str = "none"  # none | oversample (repeat positives of rare subtypes)


@dataclass
class CVConfig:
    k: int = 5
    seed: int = 42
    folds: list[int] = field(default_factory=list)  # which folds to train/predict; empty = all
    split: str = "patient"  # patient | random (random puts a patient's slices in several folds: leaks; papers only)


@dataclass
class TTAConfig:
    transforms: list[str] = field(default_factory=lambda: ["identity", "hflip"])  # identity|hflip|shift|scale
    average: str = "prob"  # prob | logit
    batch_size: int = 64


@dataclass
class StackConfig:
    model: str = "gru"  # gru | conv | gru_conv | neighbors
    hidden: int = 64
    layers: int = 2
    dropout: float = 0.1
    use_embeddings: bool = False
    embedding_dim: int = 16  # first-stage embeddings are reduced to this many principal components per model
    neighbors_k: int = 2
    epochs: int = 20
    max_steps: int = 500  # per fold; caps the epochs on competition-sized data (0 = no cap)
    lr: float = 2e-3
    batch_series: int = 64
    reverse_tta: bool = True
    seed: int = 42


@dataclass
class Config:
    name: str = "seresnext50_512"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    tta: TTAConfig = field(default_factory=TTAConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    recipe: dict[str, Any] = field(default_factory=dict)  # recipe-specific knobs (MIL, ensembles, ...)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def available() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


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
                return int(value)
        except ValueError:
            pass
    elif tp is float:
        try:
            if not isinstance(value, bool):
                return float(value)
        except (TypeError, ValueError):
            pass
    elif tp is str:
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
        if isinstance(target, dict):  # free-form section (recipe): any key is allowed
            target[".".join(parts[i:])] = yaml.safe_load(value) if isinstance(value, str) else value
            return
        names = {f.name: f for f in dataclasses.fields(target)}
        if part not in names:
            raise UserError(
                f"{source}: unknown config key '{'.'.join(parts[:i + 1])}'; known keys here: {', '.join(names)}"
            )
        if i == len(parts) - 1:
            hints = typing.get_type_hints(type(target))
            if dataclasses.is_dataclass(hints[part]):
                raise UserError(f"{source}: '{key}' is a section; set one of its keys, e.g. '{key}.{next(iter(dataclasses.fields(hints[part]))).name}'")
            setattr(target, part, _coerce(value, hints[part], f"{source}: {key}"))
        else:
            target = getattr(target, part)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "recipe" and not prefix.startswith("recipe"):
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
        raise UserError(f"unknown config '{name_or_path}'; shipped configs: {', '.join(available())} (or give a .yaml path)")
    return path


def load(name_or_path: str = "seresnext50_512", overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load a config by shipped name or YAML path, then apply `key=value` overrides."""
    path = resolve_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    cfg = Config(name=path.stem)
    recipe = raw.pop("recipe", None)
    for key, value in _flatten(raw).items():
        _set(cfg, key, value, str(path))
    if recipe is not None:
        if not isinstance(recipe, dict):
            raise UserError(f"{path}: 'recipe' must be a mapping")
        cfg.recipe.update(recipe)
    if isinstance(overrides, dict):
        overrides = [f"{k}={v}" for k, v in overrides.items()]
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like key=value, e.g. train.epochs=3")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), value.strip(), "command line")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Catch settings that would only fail deep inside a run."""
    src = f"config '{cfg.name}'"
    unknown = [w for w in cfg.data.windows if w not in WINDOWS]
    if unknown:
        raise UserError(f"{src}: unknown window(s) {unknown}; choose from {', '.join(WINDOWS)}")
    choices = {
        "train.optimizer": (cfg.train.optimizer, ("adamw", "adam", "sgd")),
        "train.scheduler": (cfg.train.scheduler, ("cosine", "onecycle", "constant")),
        "train.amp": (cfg.train.amp, ("bf16", "fp16", "none")),
        "train.loss": (cfg.train.loss, ("bce", "focal")),
        "train.class_weights": (cfg.train.class_weights, ("metric", "frequency", "balanced")),
        "cv.split": (cfg.cv.split, ("patient", "random")),
        "train.balance": (cfg.train.balance, ("none", "oversample")),
        "model.pool": (cfg.model.pool, ("avg", "gem", "avgmax")),
        "model.freeze": (cfg.model.freeze, ("none", "backbone", "partial")),
        "tta.average": (cfg.tta.average, ("prob", "logit")),
        "stack.model": (cfg.stack.model, ("gru", "conv", "gru_conv", "neighbors")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"{src}: {key}={value!r} is not one of {', '.join(allowed)}")
    bad_tta = [t for t in cfg.tta.transforms if t not in ("identity", "hflip", "shift", "scale")]
    if bad_tta:
        raise UserError(f"{src}: unknown tta.transforms {bad_tta}; choose from identity, hflip, shift, scale")
    if cfg.cv.k < 2:
        raise UserError(f"{src}: cv.k must be at least 2")
    if cfg.train.accum_steps < 1 or cfg.train.batch_size < 1 or cfg.train.epochs < 1:
        raise UserError(f"{src}: train.batch_size, train.epochs and train.accum_steps must be positive")
    from .recipes import validate as validate_recipe  # recipe.kind and its knobs (torch-free)

    validate_recipe(cfg)


def dump(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config (what a run actually used) as YAML, atomically."""
    from .io import atomic_open

    data = cfg.to_dict()
    data["augment"]["crop_scale"] = list(data["augment"]["crop_scale"])
    with atomic_open(path) as f:
        yaml.safe_dump(data, f, sort_keys=False)


def from_dict(data: dict[str, Any], source: str = "checkpoint") -> Config:
    """Rebuild a Config from `Config.to_dict()` (as stored in checkpoints and kernels)."""
    data = dict(data)
    cfg = Config(name=str(data.pop("name", "unnamed")))
    recipe = data.pop("recipe", None) or {}
    for key, value in _flatten(data).items():
        _set(cfg, key, value, source)
    cfg.recipe.update(recipe)
    validate(cfg)
    return cfg
