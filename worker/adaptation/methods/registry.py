"""Method registry: implementation classes by name. Every name must exist in the torch-free catalogue;
duplicates and unknown names fail loudly."""
from __future__ import annotations

from ..catalog import CATALOG

METHODS: dict[str, type] = {}


def register_method(name: str):
    def wrap(cls):
        if name not in CATALOG:
            raise ValueError(f"method {name!r} has no entry in adaptation.catalog")
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def get_method(name: str) -> type:
    from . import _load_all  # noqa: F401  (importing registers every method)

    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}") from None
