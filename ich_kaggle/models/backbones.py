"""Backbones (registered in `core.registry.BACKBONES`) and the single-backbone model.

A backbone name picks a family:
- any segmentation-models-pytorch encoder (`se_resnext50_32x4d`, `resnet34`, `efficientnet-b0`, ...) and any
  `tu-<timm model>` (smp's timm-universal encoder): the deepest feature map is pooled;
- `pm-<name>`: a Cadene pretrainedmodels constructor (`pm-se_resnext50_32x4d`) without its classifier;
- names registered with `@register` (the 2-layer `small_cnn` baseline).
No library is ever asked for pretrained weights (they would download); `weights.py` loads them offline.
"""

from __future__ import annotations

import difflib
import typing
import warnings
from typing import Callable

import torch
from torch import nn

from ..core.config import FreezeMode, ModelConfig
from ..core.errors import UserError
from ..core.registry import BACKBONES
from . import weights as W
from .heads import Head, ICHNet

FREEZE_MODES = typing.get_args(FreezeMode)  # declared once, by the config field `model.freeze`


def register(name: str):
    """Register a custom backbone builder `fn(in_channels) -> Backbone` under `name` (in `core.registry.BACKBONES`)."""
    return BACKBONES.register(name)


IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class Backbone(nn.Module):
    """Image in [0, 1] -> deepest feature map (B, out_channels, h, w). Subclasses say where ImageNet weights go.

    The input is normalised with the mean/std the ImageNet weights were trained with (see `input_stats`), so
    the pretrained BatchNorm statistics fit from the first step whatever the data pipeline does; channel i of a
    2.5D input uses the statistics of RGB channel i % 3, like its adapted first-conv kernel. The buffers are
    not saved in checkpoints: they follow from the backbone name.
    """

    out_channels: int

    def set_input_stats(self, mean: tuple[float, ...], std: tuple[float, ...], in_channels: int) -> None:
        index = [i % len(mean) for i in range(in_channels)]
        self.register_buffer("input_mean", torch.tensor([mean[i] for i in index]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor([std[i] for i in index]).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "input_mean", None) is not None:
            x = (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)
        return self.forward_features(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_target(self) -> nn.Module:
        """The module whose state_dict keys match the published ImageNet weights file."""
        raise NotImplementedError

    def last_stage(self) -> list[nn.Module]:
        """The deepest stage (stride 32), the part `freeze(model, 'partial')` keeps trainable."""
        raise NotImplementedError

    def load_weights(self, state: dict[str, torch.Tensor], path, name: str) -> W.LoadReport:
        return W.load_into(self.weight_target(), state, path, name)


class SmpBackbone(Backbone):
    """A segmentation-models-pytorch encoder (native or `tu-` timm-universal); only its last output is used."""

    def __init__(self, name: str, in_channels: int):
        super().__init__()
        import segmentation_models_pytorch as smp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            # weights=None: smp never downloads and, for in_channels != 3, makes a fresh first conv that
            # load_weights() then fills with the adapted RGB kernel (so the adaptation happens exactly once).
            self.encoder = smp.encoders.get_encoder(name, in_channels=in_channels, depth=5, weights=None)
        self.name = name
        self.out_channels = int(self.encoder.out_channels[-1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[-1]

    def weight_target(self) -> nn.Module:
        # timm-universal encoders keep the timm model (timm's key names) in `.model`.
        return self.encoder.model if self.name.startswith("tu-") else self.encoder

    def last_stage(self) -> list[nn.Module]:
        if self.name.startswith("tu-"):
            model = self.encoder.model
            names = model.feature_info.module_name()
            last, prev = names[-1], names[-2] if len(names) > 1 else None
            m_last, m_prev = last.rsplit(".", 1), prev.rsplit(".", 1) if prev else None
            if (
                m_prev
                and len(m_last) == 2
                and len(m_prev) == 2
                and m_last[0] == m_prev[0]
                and m_last[1].isdigit()
                and m_prev[1].isdigit()
            ):
                # e.g. EfficientNet: features at blocks.4 (stride 16) and blocks.6 -> blocks.5 and blocks.6
                return [_submodule(model, f"{m_last[0]}.{i}") for i in range(int(m_prev[1]) + 1, int(m_last[1]) + 1)]
            return [_submodule(model, last)]
        try:
            stages = self.encoder.get_stages()
        except NotImplementedError:  # smp leaves it out for densenet/vgg/xception
            return [_deepest_big_child(self.encoder)]
        return list(stages[max(stages)])

    def load_weights(self, state, path, name):
        if self.name.startswith("tu-") and "_conv_stem.weight" in state:
            state = _lukemelas_to_timm(state, self.name[3:], path)
        return super().load_weights(state, path, name)


def _lukemelas_to_timm(state: dict[str, torch.Tensor], timm_name: str, path) -> dict[str, torch.Tensor]:
    """lukemelas-named EfficientNet tensors -> timm names, pairwise in order against timm's full classifier."""
    import timm

    with torch.device("meta"):
        reference = timm.create_model(timm_name, pretrained=False)
    target = [(k, v.shape) for k, v in reference.state_dict().items()]
    return W.map_by_order(state, target, path)


class PretrainedModelsBackbone(Backbone):
    """A Cadene `pretrainedmodels` network; `features()` gives its last feature map, the classifier is dropped."""

    def __init__(self, name: str, in_channels: int):
        super().__init__()
        import pretrainedmodels

        self.name = name
        self.net = pretrainedmodels.__dict__[name](num_classes=1000, pretrained=None)
        for attr in ("last_linear", "avg_pool", "avgpool"):  # unused by features(); drop their parameters
            if isinstance(getattr(self.net, attr, None), nn.Module):
                setattr(self.net, attr, nn.Identity())
        if in_channels != 3:
            _replace_first_conv(self.net, in_channels)
        size = pretrainedmodels.pretrained_settings[name]["imagenet"]["input_size"][1:]
        with torch.no_grad(), torch.device("meta"):  # shape inference only, on a weightless copy
            probe = pretrainedmodels.__dict__[name](num_classes=1000, pretrained=None)
            self.out_channels = int(probe.features(torch.empty(1, 3, *size, device="meta")).shape[1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def weight_target(self) -> nn.Module:
        return self.net

    def last_stage(self) -> list[nn.Module]:
        for attr in ("layer4", "features", "cell_17", "block12"):
            if isinstance(getattr(self.net, attr, None), nn.Module):
                mod = getattr(self.net, attr)
                return [mod[-1]] if attr == "features" and isinstance(mod, nn.Sequential) else [mod]
        return [_deepest_big_child(self.net)]


def _replace_first_conv(net: nn.Module, in_channels: int) -> None:
    """Swap the first 3-channel Conv2d for an `in_channels` one (fresh init; pretrained weights adapt on load)."""
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            conv = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
                module.bias is not None,
                module.padding_mode,
            )
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name) if parent_name else net, child, conv)
            return
    raise UserError(f"found no 3-channel first convolution to adapt to {in_channels} input channels")


def _submodule(model: nn.Module, name: str) -> nn.Module:
    """timm's FeatureListNet flattens `stages.3` into a child called `stages_3`."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_submodule(name.replace(".", "_"))


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _deepest_big_child(net: nn.Module, share: float = 0.05) -> nn.Module:
    """Last stage of a network without a stage table: the last child holding >= `share` of all parameters,
    descending through wrappers that hold nearly everything (DenseNet's `features`)."""
    total, module = _n_params(net), net
    while True:
        big = [c for c in module.children() if _n_params(c) >= share * total]
        if not big:
            return module
        if _n_params(big[-1]) < 0.9 * _n_params(module):
            return big[-1]
        module = big[-1]


class SmallCNN(Backbone):
    """Two conv-BN-ReLU-maxpool layers (32, 64 filters): the from-scratch baseline of the small-CNN recipe."""

    def __init__(self, in_channels: int, widths: tuple[int, int] = (32, 64)):
        super().__init__()
        layers, prev = [], in_channels
        for width in widths:
            layers.append(
                nn.Sequential(
                    nn.Conv2d(prev, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            prev = width
        self.layers = nn.Sequential(*layers)
        self.out_channels = prev

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def weight_target(self) -> nn.Module:
        raise UserError("backbone 'small_cnn' has no ImageNet weights; set model.pretrained=false")

    def last_stage(self) -> list[nn.Module]:
        return [self.layers[-1]]


register("small_cnn")(lambda in_channels: SmallCNN(in_channels))


def _smp_names() -> list[str]:
    import segmentation_models_pytorch as smp

    # `timm-*` encoders are deprecated aliases of `tu-*` ones in smp 0.6.
    return [n for n in smp.encoders.get_encoder_names() if not n.startswith("timm-")]


def _pm_names() -> list[str]:
    import pretrainedmodels

    return [f"pm-{n}" for n in pretrainedmodels.model_names]


def _timm_names() -> list[str]:
    import timm

    return [f"tu-{n}" for n in timm.list_models()]


@BACKBONES.register_finder
def _family(name: str) -> Callable[[int], "Backbone"] | None:
    """Builders of the open families: `pm-<pretrainedmodels name>`, `tu-<timm model>`, smp encoder names."""
    if name.startswith("pm-"):
        import pretrainedmodels

        if name[3:] in pretrainedmodels.model_names:
            return lambda in_channels: PretrainedModelsBackbone(name[3:], in_channels)
        return None
    if name.startswith("tu-"):
        import timm

        return (lambda in_channels: SmpBackbone(name, in_channels)) if timm.is_model(name[3:]) else None
    if name in _smp_names():
        return lambda in_channels: SmpBackbone(name, in_channels)
    return None


def list_backbones() -> list[str]:
    """Every accepted backbone name except the long tail of `tu-<timm model>` (all of timm.list_models())."""
    return sorted(set(BACKBONES.names()) | set(_smp_names()) | set(_pm_names()))


def _close_matches(name: str, pool: list[str], n: int = 5) -> list[str]:
    """Names containing the query once `-`/`_` are ignored (seresnext50 -> se_resnext50_32x4d), then difflib's."""

    def norm(s: str) -> str:
        return s.lower().replace("-", "").replace("_", "")

    query = norm(name)
    contains = sorted((p for p in pool if query and query in norm(p)), key=len)
    by_norm: dict[str, list[str]] = {}
    for p in pool:
        by_norm.setdefault(norm(p), []).append(p)
    similar = [p for key in difflib.get_close_matches(query, list(by_norm), n=n, cutoff=0.5) for p in by_norm[key]]
    return list(dict.fromkeys(contains + similar))[:n]


def _describe_unknown(name: str, key: str | None = None) -> str:
    pool = list_backbones() + (_timm_names() if name.startswith("tu-") else [])
    close = _close_matches(name, pool)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return (
        f"unknown backbone '{name}' ({key or 'model.backbone'}); {hint}list them all with "
        f'`python -c "from ich_kaggle import models; print(models.list_backbones())"` (any `tu-<timm model>` works too)'
    )


BACKBONES.describe_unknown = _describe_unknown


def _unknown(name: str) -> UserError:
    return UserError(_describe_unknown(name))


def build_backbone(name: str, in_channels: int = 3) -> Backbone:
    """The named backbone with random weights and `in_channels` input channels (input normalised for it)."""
    backbone = _construct(name, in_channels)
    stats = input_stats(name)
    if stats is not None:
        backbone.set_input_stats(*stats, in_channels)
    return backbone


def _construct(name: str, in_channels: int) -> Backbone:
    if in_channels < 1:
        raise UserError(f"in_channels must be positive, got {in_channels}; check data.windows and data.neighbors")
    builder = BACKBONES.find(name)
    if builder is None:
        raise _unknown(name)
    return builder(in_channels)


def input_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) on a [0, 1] scale that the backbone's ImageNet weights expect; None for from-scratch ones."""
    if name in BACKBONES.registered():  # custom backbones (registered with a builder of their own) train from scratch
        return None
    base = name.removeprefix("pm-").removeprefix("tu-")
    if name.startswith("tu-"):
        import timm

        try:
            cfg = timm.models.get_pretrained_cfg(base)
        except Exception:
            cfg = None
        return (tuple(cfg.mean), tuple(cfg.std)) if cfg is not None else IMAGENET_STATS
    import pretrainedmodels

    setting = pretrainedmodels.pretrained_settings.get(base, {}).get("imagenet")
    if setting is None:
        return IMAGENET_STATS
    scale = float(setting.get("input_range", [0, 1])[1])  # caffe models expect 0..255
    return tuple(m / scale for m in setting["mean"]), tuple(s / scale for s in setting["std"])


def load_pretrained(backbone: Backbone, name: str, weights: str | None = None) -> W.LoadReport:
    """Fill `backbone` with ImageNet weights found offline (see `weights.find_weights`)."""
    if isinstance(backbone, SmallCNN):
        backbone.weight_target()  # raises the "no ImageNet weights" UserError
    path = W.find_weights(name, weights)
    return backbone.load_weights(W.read_state_dict(path), path, name)


def build_single(cfg: ModelConfig, in_channels: int = 3, num_classes: int = 6) -> ICHNet:
    """One backbone (+ offline ImageNet weights when cfg.pretrained) + pooling/dropout/linear head; cfg.freeze
    applied."""
    backbone = build_backbone(cfg.backbone, in_channels)
    if cfg.pretrained:
        load_pretrained(backbone, cfg.backbone, cfg.weights)
    head = Head(backbone.out_channels, num_classes=num_classes, pool=cfg.pool, dropout=cfg.dropout)
    model = ICHNet(backbone, head, backbone_name=cfg.backbone, in_channels=in_channels)
    freeze(model, cfg.freeze)
    return model


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))


def freeze(model: ICHNet, mode: str) -> int:
    """Set requires_grad for a fine-tuning recipe; returns the number of trainable parameters.

    none: everything trains. backbone: only the head and the backbone's normalisation layers train (the
    "bag of tricks" recipe: a new head on frozen features whose BatchNorm still adapts to CT windows).
    partial: only the backbone's last stage and the head train (ResNet-50 partial fine-tuning).
    """
    if mode not in FREEZE_MODES:
        raise UserError(f"model.freeze={mode!r} is not one of {', '.join(FREEZE_MODES)}; fix the config")
    model.requires_grad_(mode == "none")
    if mode == "backbone":
        for module in model.backbone.modules():
            if _is_norm(module):
                module.requires_grad_(True)
    elif mode == "partial":
        for module in model.backbone.last_stage():
            module.requires_grad_(True)
    model.head.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
