"""Adaptation methods, one file each. Adding one: its params in `catalog.py`, its file here, and one
import line in `_load_all.py`."""
from .registry import METHODS, get_method, register_method

__all__ = ["METHODS", "get_method", "register_method"]
