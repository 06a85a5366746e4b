"""Registries: the one source of the names a config may use (as timm's register_model / create_model / list_models).

Each registry DECLARES its names here, each with the module that provides its object, so checking a config, `--help`
and error messages know every name without importing a provider (`core` and `config.load` stay free of torch, timm
and OpenCV). The provider registers the object under its declared name with `@REGISTRY.register("name")`; the object
is imported only when it is built (`REGISTRY.get(name)`, `REGISTRY.build(name, ...)`). A name that is not declared
(an open family such as `tu-<any timm model>`, or a plugin registered at run time) is looked up by importing the
providers and asking their finders. tests/test_registry_build.py checks that each provider registers exactly what is
declared for it, and builds every declared name once.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Iterator

from .errors import UserError

_DECORATE = object()  # register(name) without an object: used as a decorator


def provided_by(module: str, *names: str) -> dict[str, str]:
    """name -> providing module, for a registry's declaration."""
    return dict.fromkeys(names, module)


class Registry:
    """Declared names (name -> providing module), filled with objects by `register` in those modules."""

    def __init__(self, kind: str, declared: dict[str, str], open_family: bool = False) -> None:
        self.kind = kind
        self.declared = dict(declared)
        self.providers = tuple(dict.fromkeys(declared.values()))
        # open: a name that is not declared may still be one of a provider's families (imported to ask its finders);
        # closed: it is unknown unless registered at run time, and nothing is imported to say so
        self.open_family = open_family
        self._items: dict[str, Any] = {}
        self._finders: list[Callable[[str], Any]] = []
        self._imported: set[str] = set()
        # a family with a long tail of names (timm) can say better than a list what went wrong
        self.describe_unknown: Callable[[str, str | None], str] | None = None

    def register(self, name: str, obj: Any = _DECORATE):
        """`@R.register("name")` on a function or class, or `R.register("name", obj)`."""

        def add(value):
            if name in self._items and self._items[name] is not value:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = value
            return value

        return add if obj is _DECORATE else add(obj)

    def register_finder(self, finder: Callable[[str], Any]) -> Callable[[str], Any]:
        """For open families (`tu-<any timm model>`): finder(name) -> object or None."""
        self._finders.append(finder)
        return finder

    def _import(self, modules: tuple[str, ...]) -> None:
        for module in modules:
            if module not in self._imported:
                self._imported.add(module)
                importlib.import_module(module)

    def names(self) -> list[str]:
        """The declared names and any registered at run time; imports nothing."""
        return list(dict.fromkeys([*self.declared, *self._items]))

    def registered(self) -> list[str]:
        """Names registered with an object of their own (not found through a family's finder); imports providers."""
        self._import(self.providers)
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        if name in self.declared or name in self._items:
            return True
        return self._lookup(name)[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _lookup(self, name: str) -> tuple[bool, Any]:
        if name in self.declared:
            self._import((self.declared[name],))
        elif self.open_family:
            self._import(self.providers)
        if name in self._items:
            return True, self._items[name]
        for finder in self._finders:
            found = finder(name)
            if found is not None:
                return True, found
        if name in self.declared:
            raise LookupError(
                f"{self.kind} {name!r} is declared in core/registry.py but {self.declared[name]} "
                "registers no object for it"
            )
        return False, None

    def check(self, name: str, key: str | None = None) -> None:
        """One line naming the config key, the value, close matches and the choices, unless `name` is known.

        A declared name is known without importing anything."""
        if name not in self:
            raise UserError(self.unknown(name, key))

    def find(self, name: str) -> Any:
        """The object named `name`, or None."""
        return self._lookup(name)[1]

    def get(self, name: str, key: str | None = None) -> Any:
        """The object named `name` (its provider imported now); else the one line of `check`."""
        known, found = self._lookup(name)
        if not known:
            raise UserError(self.unknown(name, key))
        return found

    def build(self, name: str, *args: Any, key: str | None = None, **kwargs: Any) -> Any:
        """The object named `name` called with the arguments: a registered class or factory builds its object."""
        return self.get(name, key)(*args, **kwargs)

    def unknown(self, name: str, key: str | None = None) -> str:
        if self.describe_unknown is not None:
            return self.describe_unknown(name, key)
        names = self.names()
        close = difflib.get_close_matches(str(name), names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return f"{key or self.kind}={name!r} is not one of {', '.join(names)}{hint}"


# Backbones: the names the shipped configs use and a few worth listing, all built by models/backbones.py (its family
# finder: any segmentation-models-pytorch encoder, `tu-<any timm model>`, `pm-<pretrainedmodels name>`; those are
# accepted too, checked by importing the libraries when the name is not declared here).
BACKBONES = Registry(
    "backbone",
    provided_by(
        "ich_kaggle.models.backbones",
        "small_cnn",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnext50_32x4d",
        "se_resnet50",
        "se_resnext50_32x4d",
        "se_resnext101_32x4d",
        "efficientnet-b3",
        "tu-tf_efficientnet_lite0",
        "tu-efficientnet_b0",
        "tu-convnext_tiny",
        "pm-se_resnext50_32x4d",
    ),
    open_family=True,
)
LOSSES = Registry("loss", provided_by("ich_kaggle.engine.losses", "bce", "focal"))
OPTIMIZERS = Registry("optimizer", provided_by("ich_kaggle.engine.optim", "adamw", "adam", "sgd"))
SCHEDULERS = Registry("scheduler", provided_by("ich_kaggle.engine.optim", "onecycle", "cosine", "constant"))
POOLS = Registry("pooling", provided_by("ich_kaggle.models.heads", "avg", "gem", "avgmax"))
STACK_MODELS = Registry("stack model", provided_by("ich_kaggle.stack.fit", "gru", "conv", "gru_conv"))
TTA = Registry(
    "TTA transform",
    provided_by(
        "ich_kaggle.predict.tta", "identity", "hflip", "shift", "shift_back", "scale", "transpose", "hflip_transpose"
    ),
)
# the augmentations (probability > 0) through which training shows the model each view's kind of image: a view the
# model never saw only adds noise to the average, so the config check refuses it
TTA_NEEDS: dict[str, tuple[str, ...]] = {
    "hflip": ("hflip",),
    "shift": ("shift_scale_rotate",),
    "shift_back": ("shift_scale_rotate",),
    "transpose": ("transpose",),
    "hflip_transpose": ("hflip", "transpose"),
}
WINDOWS = Registry("window", provided_by("ich_kaggle.data.windows", "brain", "subdural", "soft_tissue", "bone"))
RECIPES = Registry("recipe", provided_by("ich_kaggle.recipes", "standard", "mil"))
