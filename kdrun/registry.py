"""Name -> factory registries (models, losses, datasets, schemes).

One decorator registers a thing under its name; the packages of models and KD methods import every module
they hold, so a new model or KD method is its module plus its YAML, listed nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from kdrun.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, key: str):
        self.kind = kind  # "model", "loss", ...
        self.key = key  # config key shown in errors, e.g. "teacher.name"
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            n = name or obj.__name__  # type: ignore[attr-defined]
            if n in self._items:
                raise ValueError(f"{self.kind} '{n}' registered twice")
            self._items[n] = obj
            return obj

        return deco

    def get(self, name: str, key: str | None = None) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"{key or self.key}={name}: unknown {self.kind}; valid: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
