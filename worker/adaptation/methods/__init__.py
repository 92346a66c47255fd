"""Adaptation methods, one file each. Adding one: its params and `@describe` in `app/contract/catalog`,
its file here with `@implements(ItsParams)` (`_load_all` imports every file of this package)."""
from .registry import METHODS, get_method, implements

__all__ = ["METHODS", "get_method", "implements"]
