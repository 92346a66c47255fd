"""Clean virtual environments holding adaptd as a user installs it: the wheel built from this
checkout plus exactly the dependencies its metadata names for the chosen extras. Offline: the
dependencies are linked from the environment running the tests (never downloaded), so anything the
wheel's metadata forgets is missing in the clean environment, as it would be after `pip install`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.services import REPO

SOURCES = ("pyproject.toml", "README.md", "app", "worker", "migrations")


def build_wheel(out: Path) -> Path:
    """`pip wheel` of a copy of the checkout (builds leave nothing in the working tree)."""
    src = out / "src"
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(
            REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                        if (REPO / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(out / "dist"), str(src)], check=True, capture_output=True)
    return next((out / "dist").glob("adaptd-*.whl"))


def _closure(root: metadata.Distribution, extras: set[str]) -> dict[str, metadata.Distribution]:
    """Every distribution `root[extras]` needs, found in the running environment."""
    found: dict[str, metadata.Distribution] = {}
    todo: list[tuple[metadata.Distribution, set[str]]] = [(root, extras)]
    done: set[tuple[str, frozenset]] = set()
    while todo:
        dist, wanted = todo.pop()
        key = (canonicalize_name(dist.metadata["Name"]), frozenset(wanted))
        if key in done:
            continue
        done.add(key)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (wanted or {""})):
                continue
            name = canonicalize_name(req.name)
            dep = root if name == canonicalize_name(root.metadata["Name"]) else metadata.distribution(req.name)
            if dep is not root:
                found[name] = dep
            todo.append((dep, set(req.extras)))
    return found


def make_venv(path: Path, wheel: Path, extras: tuple[str, ...] = ()) -> Path:
    """A venv with the wheel installed (console script included) and the closure of `adaptd[extras]`
    linked in. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    ours = next(d for d in metadata.distributions(path=[str(site)]) if d.metadata["Name"] == "adaptd")
    for dist in _closure(ours, set(extras)).values():
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")} - {"__pycache__"}
        for top in tops:
            target = site / top
            if (base / top).exists() and not target.exists():
                os.symlink(base / top, target)
    return python
