"""Method registry: each implementation registers against its params class in the torch-free catalogue
(`@implements(TentParams)`), which binds it to that one catalogue entry and gives it its name. A class
registered twice, or a params class that describes no method, fails loudly; tests/engine/
test_registries.py keeps catalogue == implementations."""
from __future__ import annotations

from app.contract.catalog import MethodInfo, MethodParams, info_for_params

METHODS: dict[str, type] = {}


def implements(params_model: type[MethodParams]):
    info = info_for_params(params_model)

    def wrap(cls):
        if info.name in METHODS:
            raise ValueError(f"method {info.name!r} is implemented twice")
        cls.name = info.name
        cls.info = info
        METHODS[info.name] = cls
        return cls

    return wrap


def get_method(name: str) -> type:
    from . import _load_all  # noqa: F401  (importing registers every method)

    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "MethodInfo", "get_method", "implements"]
