"""Imports every method module in this package so their @implements decorators run: adding a
method is adding its file (plus its params in `catalog`)."""
import importlib
import pkgutil
from pathlib import Path

# Modules of this package that hold shared code, not a method.
SHARED_MODULES = {"base", "norm", "registry", "augment"}

for _info in pkgutil.iter_modules([str(Path(__file__).parent)]):
    if _info.name not in SHARED_MODULES and not _info.name.startswith("_"):
        importlib.import_module(f"{__package__}.{_info.name}")
