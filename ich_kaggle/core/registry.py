"""Registries: the one source of the names a config may use (as timm's register_model / create_model / list_models).

Whatever defines a backbone, loss, optimizer, scheduler, stack model, TTA transform, window or recipe registers it
with `@REGISTRY.register("name")`; config checks, `--help`, error messages and tests ask the registry. The core never
imports its plugins: each registry names the modules that fill it, and imports them by name the first time it is
asked (so `ich_kaggle.core` stays free of torch until a name is actually looked up).
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Iterator

from .errors import UserError


_DECORATE = object()  # register(name) without an object: used as a decorator


class Registry:
    """name -> object, filled by `register` in the modules listed in `providers`."""

    def __init__(self, kind: str, providers: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.providers = providers
        self._items: dict[str, Any] = {}
        self._finders: list[Callable[[str], Any]] = []
        self._loaded = not providers
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

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self.providers:
                importlib.import_module(module)

    def names(self) -> list[str]:
        self._load()
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return self._lookup(name)[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _lookup(self, name: str) -> tuple[bool, Any]:
        self._load()
        if name in self._items:
            return True, self._items[name]
        for finder in self._finders:
            found = finder(name)
            if found is not None:
                return True, found
        return False, None

    def find(self, name: str) -> Any:
        """The object named `name`, or None."""
        return self._lookup(name)[1]

    def get(self, name: str, key: str | None = None) -> Any:
        """The object named `name`; else one line naming the config key, the value, close matches and the choices."""
        known, found = self._lookup(name)
        if not known:
            raise UserError(self.unknown(name, key))
        return found

    def unknown(self, name: str, key: str | None = None) -> str:
        if self.describe_unknown is not None:
            return self.describe_unknown(name, key)
        names = self.names()
        close = difflib.get_close_matches(str(name), names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return f"{key or self.kind}={name!r} is not one of {', '.join(names)}{hint}"


BACKBONES = Registry("backbone", ("ich_kaggle.models.backbones",))
LOSSES = Registry("loss", ("ich_kaggle.engine.losses",))
OPTIMIZERS = Registry("optimizer", ("ich_kaggle.engine.optim",))
SCHEDULERS = Registry("scheduler", ("ich_kaggle.engine.optim",))
POOLS = Registry("pooling", ("ich_kaggle.models.heads",))
STACK_MODELS = Registry("stack model", ("ich_kaggle.stack.nets", "ich_kaggle.stack.neighbors"))
TTA = Registry("TTA transform", ("ich_kaggle.predict.tta",))
WINDOWS = Registry("window", ("ich_kaggle.data.windows",))
RECIPES = Registry("recipe", ("ich_kaggle.recipes",))
