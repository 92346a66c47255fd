"""What a model upload holds, read without torch and without unpickling: the safetensors header (tensor
names, shapes, dtypes, `__metadata__`), or a `torch.save` file's pickle read opcode by opcode.

A pickle is judged by its GLOBAL opcodes: torch's `weights_only=True` unpickler allows a fixed set of
globals (tensor rebuilders, storage types, OrderedDict...), listed in the architecture key manifest by
the generator; any other global, or an opcode that unpickler refuses (STACK_GLOBAL, INST, OBJ), means
the file needs full unpickling → `unsafe_checkpoint`, decided before any byte reaches a worker. The
state dict's keys and shapes are then read by a tiny stack machine that builds nothing but
containers, strings, numbers and shape records."""
from __future__ import annotations

import io
import json
import pickletools
import struct
import zipfile
from dataclasses import dataclass, field
from typing import IO

from . import CheckError

# Shared with the worker's loader (worker/adaptation/models/loading.py): how a checkpoint may wrap its
# state dict, and the key prefixes that DataParallel/DDP and torch.compile add.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")
STRIP_PREFIXES = ("module.", "_orig_mod.")
MAX_HEADER_BYTES = 100_000_000   # a safetensors header longer than this is not one
MAX_PICKLE_BYTES = 64 * 1024**2  # a state dict's pickle is kilobytes; bigger ones are left to the worker
REFUSED_OPCODES = {"STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"}  # weights_only refuses these
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.save's pre-1.6 format starts with this pickled number


@dataclass
class Checkpoint:
    format: str                                      # "safetensors" or "pt"
    shapes: dict[str, list[int]] | None = None       # state-dict key -> shape; None: layout not readable
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors __metadata__
    notes: list[str] = field(default_factory=list)


def align_keys(expected: set[str], keys: list[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """How the worker's loader lines a checkpoint's keys up with the architecture's, and the submit check
    the same way: the DataParallel/compile prefixes stripped; one wrapper prefix on every key (e.g.
    'model.', 'net.') stripped when that makes more keys match; BatchNorm `num_batches_tracked` buffers
    absent from checkpoints saved before PyTorch 0.4 (torchvision's published ResNets) allowed.
    Returns (checkpoint key -> aligned key, keys left out of it being dropped; absent num_batches_tracked
    keys; notes)."""
    rename, notes = {k: k for k in keys}, []
    changed = True
    while changed:  # e.g. "_orig_mod.module." (compiled DDP) or "module._orig_mod."
        changed = False
        for prefix in STRIP_PREFIXES:
            if rename and all(v.startswith(prefix) for v in rename.values()):
                rename = {k: v[len(prefix):] for k, v in rename.items()}
                notes.append(f"stripped '{prefix}' prefix")
                changed = True
    aligned = set(rename.values())
    if aligned != expected and aligned and all("." in k for k in aligned):
        firsts = {k.split(".", 1)[0] for k in aligned}
        if len(firsts) == 1:
            prefix = firsts.pop() + "."
            if sum(k[len(prefix):] in expected for k in aligned) > sum(k in expected for k in aligned):
                rename = {k: v[len(prefix):] for k, v in rename.items()}
                notes.append(f"stripped '{prefix}' prefix")
    aligned = set(rename.values())
    absent_nbt = [k for k in expected if k.endswith(".num_batches_tracked") and k not in aligned
                  and f"{k.rsplit('.', 1)[0]}.running_mean" in aligned]
    if absent_nbt:
        notes.append(f"{len(absent_nbt)} BatchNorm num_batches_tracked buffers absent from the checkpoint: set to 0")
    # The reverse: a detector trained with live BatchNorm2d (torchvision built without weights) loaded into
    # the FrozenBatchNorm2d layers its COCO checkpoints use, which have no such buffer (and drop it).
    extra_nbt = [k for k, v in rename.items() if v.endswith(".num_batches_tracked") and v not in expected
                 and f"{v.rsplit('.', 1)[0]}.running_mean" in expected]
    if extra_nbt:
        notes.append(f"{len(extra_nbt)} num_batches_tracked buffers of frozen BatchNorm layers dropped")
        rename = {k: v for k, v in rename.items() if k not in set(extra_nbt)}
    return rename, absent_nbt, notes


def sniff_format(head: bytes) -> str | None:
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len < MAX_HEADER_BYTES and head[8:9] == b"{":
            return "safetensors"
    if head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return "pt"
    return None


def inspect_checkpoint(f: IO[bytes], size: int, allowed_globals: frozenset[str],
                       declared: str | None = None) -> Checkpoint:
    head = f.read(16)
    fmt = sniff_format(head)
    if fmt is None:
        raise CheckError("unsupported_format", "could not detect the checkpoint format (expected safetensors "
                              "or a torch.save state dict)" + (f"; the file was declared {declared!r}" if declared else ""))
    if declared is not None and declared != fmt:
        raise CheckError("format_mismatch", f"the checkpoint was declared {declared!r} but is {fmt!r}",
                              {"declared": declared, "detected": fmt})
    f.seek(0)
    if fmt == "safetensors":
        return _safetensors(f, size)
    return _torch(f, head, allowed_globals)


def _safetensors(f: IO[bytes], size: int) -> Checkpoint:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8:
        raise CheckError("invalid_checkpoint", "not a readable safetensors file: the header is longer than the file")
    try:
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None) or {}
        shapes = {k: [int(d) for d in v["shape"]] for k, v in header.items()}
        ends = [int(v["data_offsets"][1]) for v in header.values()]
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckError("invalid_checkpoint", f"not a readable safetensors file: bad header ({exc})") from None
    if ends and max(ends) > size - 8 - n:
        raise CheckError("invalid_checkpoint", "not a readable safetensors file: the tensors run past the "
                              "end of the file (truncated upload?)")
    return Checkpoint("safetensors", shapes, {str(k): str(v) for k, v in meta.items()})


def _torch(f: IO[bytes], head: bytes, allowed: frozenset[str]) -> Checkpoint:
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(f) as zf:
                names = zf.namelist()
                if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
                    raise CheckError("unsupported_format", "TorchScript archives are not accepted (loading one "
                                          "runs its code); upload `model.state_dict()` saved with torch.save, or "
                                          "safetensors")
                pkl = next((n for n in names if n.endswith("data.pkl") and n.count("/") <= 1), None)
                if pkl is None:
                    raise CheckError("invalid_checkpoint", "a zip file without the data.pkl of torch.save")
                if zf.getinfo(pkl).file_size > MAX_PICKLE_BYTES:
                    return Checkpoint("pt", None, notes=["pickle too large to inspect at submit"])
                data = zf.read(pkl)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise CheckError("invalid_checkpoint", f"not a readable torch checkpoint: {exc}") from None
        return _from_pickles([data], allowed)
    # Before torch 1.6: magic number, protocol, system info, then the object, as consecutive pickles.
    stream = io.BytesIO(f.read(MAX_PICKLE_BYTES))
    pickles = []
    for _ in range(4):
        start = stream.tell()
        try:
            for _op in pickletools.genops(stream):
                pass
        except Exception:  # noqa: BLE001 - truncated/garbled, or the object pickle longer than the cap
            break
        pickles.append(stream.getvalue()[start:stream.tell()])
        if len(pickles) == 1 and _run(pickles[0], allowed) != LEGACY_MAGIC:
            break  # a bare pickle: the object is this one
    if not pickles:
        raise CheckError("invalid_checkpoint", "not a readable torch checkpoint: the pickle is damaged")
    return _from_pickles(pickles[-1:], allowed)


def _from_pickles(pickles: list[bytes], allowed: frozenset[str]) -> Checkpoint:
    shapes, notes = _state_shapes(_run(pickles[-1], allowed))
    return Checkpoint("pt", shapes, notes=notes)


# --- the stack machine ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Global:
    name: str


@dataclass(frozen=True)
class _Tensor:
    shape: tuple[int, ...]


class _Opaque:
    """An object the machine does not build (its class is allowed, its content does not matter here)."""


_REBUILD_TENSOR = {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor",
                   "torch._utils._rebuild_tensor_v3"}
_REBUILD_PARAMETER = {"torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"}
_MARK = object()


def _refuse(name: str) -> CheckError:
    return CheckError(
        "unsafe_checkpoint", "the checkpoint needs full unpickling (it contains Python objects, e.g. a pickled "
        "nn.Module), which could run arbitrary code; save `model.state_dict()` with torch.save, or use safetensors",
        {"global": name, "reason": f"GLOBAL {name} is not allowed by torch.load(weights_only=True)"})


def _run(data: bytes, allowed: frozenset[str]):
    """Execute the pickle over containers and shape records only. Every GLOBAL is checked first."""
    try:
        ops = list(pickletools.genops(data))
    except Exception as exc:  # noqa: BLE001
        raise CheckError("invalid_checkpoint", f"not a readable torch checkpoint: {exc}") from None
    for op, arg, _pos in ops:
        if op.name in REFUSED_OPCODES:
            raise _refuse(f"<{op.name} opcode>")
        if op.name == "GLOBAL":
            name = arg.replace(" ", ".", 1)
            if name not in allowed:
                raise _refuse(name)
    stack: list = []
    memo: dict = {}

    def pop_mark() -> list:
        i = len(stack) - 1 - stack[::-1].index(_MARK)
        items = stack[i + 1:]
        del stack[i:]
        return items

    for op, arg, _pos in ops:
        name = op.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            return stack.pop() if stack else None
        if name == "MARK":
            stack.append(_MARK)
        elif name in ("EMPTY_DICT",):
            stack.append({})
        elif name in ("EMPTY_LIST",):
            stack.append([])
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name in ("EMPTY_SET",):
            stack.append(_Opaque())
        elif name in ("NONE",):
            stack.append(None)
        elif name == "NEWTRUE":
            stack.append(True)
        elif name == "NEWFALSE":
            stack.append(False)
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name == "LIST":
            stack.append(pop_mark())
        elif name == "DICT":
            items = pop_mark()
            stack.append(dict(zip(items[::2], items[1::2])))
        elif name == "APPEND":
            value = stack.pop()
            if isinstance(stack[-1], list):
                stack[-1].append(value)
        elif name == "APPENDS":
            items = pop_mark()
            if isinstance(stack[-1], list):
                stack[-1].extend(items)
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            if isinstance(stack[-1], dict):
                stack[-1][_hashable(key)] = value
        elif name == "SETITEMS":
            items = pop_mark()
            if isinstance(stack[-1], dict):
                stack[-1].update((_hashable(k), v) for k, v in zip(items[::2], items[1::2]))
        elif name in ("ADDITEMS", "POP_MARK"):
            pop_mark()
        elif name == "FROZENSET":
            pop_mark()
            stack.append(_Opaque())
        elif name == "POP":
            stack.pop()
        elif name == "DUP":
            stack.append(stack[-1])
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif name == "GLOBAL":
            stack.append(_Global(arg.replace(" ", ".", 1)))
        elif name in ("BINPERSID", "PERSID"):
            stack.pop()
            stack.append(_Opaque())  # a storage: its bytes live elsewhere in the archive
        elif name == "REDUCE":
            args, fn = stack.pop(), stack.pop()
            stack.append(_reduce(fn, args))
        elif name == "NEWOBJ":
            stack.pop()
            stack[-1] = _Opaque()
        elif name == "BUILD":
            stack.pop()  # the state of an object (a state dict's `_metadata`): not needed
        elif op.arg is not None or name in ("BINFLOAT", "FLOAT"):
            stack.append(arg)  # ints, floats, strings, bytes
        else:
            raise CheckError("invalid_checkpoint", f"unexpected pickle opcode {name}")
    raise CheckError("invalid_checkpoint", "the pickle has no STOP")


def _hashable(key):
    return key if isinstance(key, (str, int, float, bool, type(None), tuple)) else repr(key)


def _reduce(fn, args):
    name = fn.name if isinstance(fn, _Global) else None
    if name in _REBUILD_TENSOR and isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], tuple):
        return _Tensor(tuple(int(d) for d in args[2]))
    if name in _REBUILD_PARAMETER and isinstance(args, tuple) and args:
        return args[0]
    if name == "collections.OrderedDict":
        return {}
    return _Opaque()


def _state_shapes(obj) -> tuple[dict[str, list[int]] | None, list[str]]:
    """The state dict inside `obj` (unwrapped as the worker's loader does), as key -> shape."""
    notes: list[str] = []
    while isinstance(obj, dict) and not _is_tensor_dict(obj):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            return None, notes  # not a state dict: the worker reports it precisely
        notes.append(f"unwrapped '{key}'")
        obj = obj[key]
    if not isinstance(obj, dict):
        return None, notes
    return {k: list(v.shape) for k, v in obj.items()}, notes


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, _Tensor) for k, v in d.items())
