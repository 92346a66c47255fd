"""The architecture key manifest (architecture_keys.json, committed): for every built-in architecture
the state-dict keys and shapes it has with its default arguments, and how each dimension moves with each
integer argument (`num_classes`, `in_channels`, `width`...), learnt by building the model on the `meta`
device at a few values. Plus the globals torch's `weights_only=True` unpickler allows. Torch-free to
read: the API compares an upload's keys and shapes with it at submit, and solves for the arguments
that would make a mismatching checkpoint fit (the suggestion in the error).

Regenerate (needs torch): `python -m app.checks.manifest`; tests/test_submit_checks.py regenerates it
and compares, so it cannot drift from the architectures."""
from __future__ import annotations

import inspect
import json
from functools import lru_cache
from pathlib import Path

from . import CheckError
from .checkpoints import STRIP_PREFIXES

PATH = Path(__file__).with_name("architecture_keys.json")
STEPS = (1, 2, 3, 4, 6, 8)  # the first step s at which base+s and base+2s both build is used
TRIM = 20  # keys listed in an error


# --- generation (torch) ------------------------------------------------------------------------------

def generate() -> dict:
    import torch
    import torch._weights_only_unpickler as weights_only

    from worker.adaptation.models.registry import ARCHITECTURES, _ensure_builtins_loaded

    _ensure_builtins_loaded()

    def shapes(factory, kwargs) -> dict[str, list[int]] | None:
        try:
            with torch.device("meta"):
                model = factory(**kwargs)
        except (ValueError, TypeError, RuntimeError, AssertionError):
            return None
        return {k: list(v.shape) for k, v in model.state_dict().items()}

    out = {}
    for name, factory in sorted(ARCHITECTURES.items()):
        base_classes = inspect.signature(factory).parameters["num_classes"].default
        with torch.device("meta"):
            cls = type(factory(num_classes=base_classes))
        defaults = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
                    if n not in ("self", "num_classes") and p.default is not inspect.Parameter.empty}
        # What the factory passes on (wrn28_10 fixes depth and widen_factor itself: refused there).
        ref = shapes(factory, {"num_classes": base_classes})
        accepted = {n: v for n, v in defaults.items() if shapes(factory, {"num_classes": base_classes, n: v}) == ref}
        base = {n: v for n, v in accepted.items() if isinstance(v, int) and not isinstance(v, bool)}
        base["num_classes"] = base_classes
        dims = {k: [[v, {}] for v in shape] for k, shape in ref.items()}
        structural, opaque = [], []
        for param in sorted(base):
            for step in STEPS:
                one = shapes(factory, {"num_classes": base_classes, param: base[param] + step})
                two = shapes(factory, {"num_classes": base_classes, param: base[param] + 2 * step})
                if one is not None and two is not None:
                    break
            else:
                opaque.append(param)
                continue
            if set(one) != set(ref) or set(two) != set(ref):
                structural.append(param)
                continue
            for key, shape in ref.items():
                for i, v in enumerate(shape):
                    d1, d2 = one[key][i] - v, two[key][i] - v
                    if d1 or d2:
                        dims[key][i][1][param] = d1 / step if d2 == 2 * d1 else None
        out[name] = {"accepted_kwargs": sorted(set(accepted) | {"num_classes"}), "base": base,
                     "structural": structural, "opaque": opaque,
                     "keys": {k: [v if not deps else [v, deps] for v, deps in d] for k, d in dims.items()}}
    return {"weights_only_globals": sorted(weights_only._get_allowed_globals()), "architectures": out}


def write() -> None:
    PATH.write_text(json.dumps(generate(), indent=None, sort_keys=True, separators=(",", ":")) + "\n")


# --- use (torch-free) --------------------------------------------------------------------------------

@lru_cache
def load() -> dict:
    return json.loads(PATH.read_text())


def allowed_globals() -> frozenset[str]:
    return frozenset(load()["weights_only_globals"])


def _expected(entry: dict, params: dict) -> dict[str, list[int | None]]:
    """Shapes at `params`; None for a dimension that moves non-linearly with a changed argument."""
    out = {}
    for key, dims in entry["keys"].items():
        shape = []
        for d in dims:
            if isinstance(d, int):
                shape.append(d)
                continue
            value, deps = d
            for p, slope in deps.items():
                delta = params[p] - entry["base"][p]
                if delta and slope is None:
                    value = None
                    break
                value += (slope or 0) * delta
            shape.append(None if value is None else int(round(value)))
        out[key] = shape
    return out


def _align(expected: set[str], shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """The key alignment the worker's loader applies: DataParallel/compile prefixes, one wrapper prefix
    on every key, BatchNorm `num_batches_tracked` absent from old checkpoints."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if shapes and all(k.startswith(prefix) for k in shapes):
                shapes, changed = {k[len(prefix):]: v for k, v in shapes.items()}, True
    if set(shapes) != expected and shapes and all("." in k for k in shapes):
        firsts = {k.split(".", 1)[0] for k in shapes}
        if len(firsts) == 1:
            prefix = firsts.pop() + "."
            stripped = {k[len(prefix):]: v for k, v in shapes.items()}
            if sum(k in expected for k in stripped) > sum(k in expected for k in shapes):
                shapes = stripped
    for k in expected:
        if k.endswith(".num_batches_tracked") and k not in shapes and f"{k.rsplit('.', 1)[0]}.running_mean" in shapes:
            shapes = {**shapes, k: []}
    return shapes


def _differences(expected: dict[str, list], shapes: dict[str, list[int]]):
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    mismatched = {k: {"expected": expected[k], "got": shapes[k]} for k in expected if k in shapes and (
        len(expected[k]) != len(shapes[k]) or any(e is not None and e != g for e, g in zip(expected[k], shapes[k])))}
    return missing, unexpected, mismatched


def _solve(entry: dict, params: dict, shapes: dict[str, list[int]], mismatched: dict) -> dict | None:
    """Integer arguments that make every shape fit, from the dimensions that move with one argument."""
    candidate: dict[str, int] = {}
    for key in mismatched:
        for d, got in zip(entry["keys"][key], shapes[key]):
            if isinstance(d, int) or len(d[1]) != 1:
                continue
            (p, slope), = d[1].items()
            if not slope:
                continue
            others = d[0] + sum((s or 0) * (params[q] - entry["base"][q]) for q, s in d[1].items() if q != p)
            value = entry["base"][p] + (got - others) / slope
            if value != int(value) or value < 1 or candidate.get(p, int(value)) != int(value):
                return None
            candidate[p] = int(value)
    if not candidate:
        return None
    trial = {**params, **candidate}
    if any(_differences(_expected(entry, trial), shapes)):
        return None
    return {p: v for p, v in candidate.items() if v != params[p]} or None


def check_keys(architecture: str, num_classes: int, arch_kwargs: dict, shapes: dict[str, list[int]]) -> list[str]:
    """Raise CheckError (`invalid_arch_kwargs`, `num_classes_mismatch`, `shape_mismatch`) when the
    checkpoint cannot load into the architecture as specified. Returns notes on what was not checked."""
    entry = load()["architectures"].get(architecture)
    if entry is None:
        return [f"{architecture}: not a built-in architecture, keys are checked by the worker"]
    unknown = sorted(set(arch_kwargs) - set(entry["accepted_kwargs"]) | ({"num_classes"} & set(arch_kwargs)))
    if unknown:
        raise CheckError("invalid_arch_kwargs", f"model.arch_kwargs: {architecture} does not take {unknown}; "
                              f"it takes {[k for k in entry['accepted_kwargs'] if k != 'num_classes']}",
                              {"field": "model.arch_kwargs", "unknown": unknown,
                               "accepted": [k for k in entry["accepted_kwargs"] if k != "num_classes"]})
    params = {**entry["base"], "num_classes": num_classes}
    for k, v in arch_kwargs.items():
        if k in params:
            if not isinstance(v, int) or isinstance(v, bool):
                return [f"arch_kwargs {k}={v!r} is not an integer: keys are checked by the worker"]
            params[k] = v
    if any(k in arch_kwargs for k in entry["structural"] + entry["opaque"]):
        return ["arch_kwargs change the architecture's keys: they are checked by the worker"]
    expected = _expected(entry, params)
    shapes = _align(set(expected), shapes)
    missing, unexpected, mismatched = _differences(expected, shapes)
    if not (missing or unexpected or mismatched):
        return []
    fix = None if missing or unexpected else _solve(entry, params, shapes, mismatched)
    detail = {"missing": missing[:TRIM], "unexpected": unexpected[:TRIM],
              "shape_mismatch": dict(list(mismatched.items())[:TRIM]),
              "counts": {"missing": len(missing), "unexpected": len(unexpected), "shape_mismatch": len(mismatched)}}
    spec = f"{architecture} (num_classes={num_classes}, arch_kwargs={json.dumps(arch_kwargs, sort_keys=True)})"
    if fix is not None and set(fix) == {"num_classes"}:
        raise CheckError("num_classes_mismatch", f"the checkpoint's classifier has {fix['num_classes']} outputs, "
                              f"the spec says num_classes={num_classes}: set model.num_classes to {fix['num_classes']}",
                              {**detail, "checkpoint_num_classes": fix["num_classes"], "num_classes": num_classes,
                               "suggestion": {"num_classes": fix["num_classes"]}})
    shown = "; ".join(f"{k}: expected {v['expected']}, got {v['got']}" for k, v in list(mismatched.items())[:3])
    message = (f"the checkpoint does not match {spec}: {len(missing)} missing, {len(unexpected)} unexpected, "
               f"{len(mismatched)} with another shape" + (f" ({shown})" if shown else "")
               + (f"; missing e.g. {missing[:3]}" if missing else "") + (f"; unexpected e.g. {unexpected[:3]}" if unexpected else ""))
    if fix is not None:
        suggestion = {}
        if "num_classes" in fix:
            suggestion["num_classes"] = fix.pop("num_classes")
        if fix:
            suggestion["arch_kwargs"] = {**arch_kwargs, **fix}
        detail["suggestion"] = suggestion
        message += "; it fits with " + ", ".join(f"model.{k} = {json.dumps(v, sort_keys=True)}" for k, v in suggestion.items())
    raise CheckError("shape_mismatch", message, detail)


if __name__ == "__main__":
    write()
    print(f"wrote {PATH}")
