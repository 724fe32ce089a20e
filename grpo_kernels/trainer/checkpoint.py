"""Checkpoints that survive being killed mid-write and never need unpickling.

A checkpoint is a directory ``<root>/step_<N>/``: tensors in safetensors files, everything else
(step, config, scheduler, RNG states) in ``state.json``. It is written under a temporary name,
every file and the directory are fsynced, and only then is it renamed into place: the rename is
the commit, so a directory named ``step_<N>`` is always complete, and a kill at any moment leaves
at worst a ``.tmp-*`` directory that is ignored and cleaned up. Old checkpoints are renamed away
before they are deleted, for the same reason.

Only complete checkpoints count: a ``step_<N>`` directory without ``state.json`` (not ours) is
ignored when looking for the newest one, and never deleted. ``state.json`` is written last and
records the size and SHA-256 of every other file; :func:`read_state` checks every field of it
(types, ranges, the step against the directory's name and the config) and verifies the
checksums, so an edited or corrupted checkpoint is refused with an error naming the file and
the field instead of resuming from wrong numbers.

Loading reads safetensors and JSON only: a checkpoint from an untrusted source cannot run code.

A data-parallel run (torchrun) writes format 3 instead: the tensors through
``torch.distributed.checkpoint`` (DCP: each rank writes its shards, ``__<rank>_0.distcp``, and
rank 0 the ``.metadata`` index), ``state.json`` with the same fields plus ``world_size``, written
by rank 0 after every rank's files, and the same temporary directory and rename. DCP stores each
tensor with its global shape, so a format 3 checkpoint loads into any number of processes, one
included, DDP or FSDP2; a format 2 checkpoint loads into a data-parallel run as well. DCP's index
is a pickle: it is read with an unpickler that builds only DCP's own metadata classes (and torch
sizes and dtypes), and its other values with ``torch.load(weights_only=True)``, so format 3 cannot
run code either.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .._checks import is_real_number
from .config import TrainerConfig

# 2: state.json records a checksum per file (format 1 checkpoints had none and are refused).
FORMAT_VERSION = 2
# 3: a data-parallel run's checkpoint: DCP files instead of the safetensors, and world_size.
DCP_FORMAT_VERSION = 3
STATE_FILE = "state.json"
# Every top-level field of state.json; read_state refuses a missing or unknown one.
STATE_KEYS = ("format", "step", "config", "metadata", "scheduler", "optimizer", "rng", "files")
DCP_STATE_KEYS = STATE_KEYS + ("world_size",)
# Tensor files every checkpoint has (ref_model.safetensors too when beta > 0).
REQUIRED_FILES = ("model.safetensors", "optimizer.safetensors")
DCP_REQUIRED_FILES = (".metadata",)  # DCP's index of every rank's shards
_NAME = re.compile(r"^step_(\d+)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted; the message names the file and the field."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root (``step_<N>`` directories holding a state.json), oldest first.

    A ``step_<N>`` directory without state.json was not written by :func:`write_checkpoint` (whose
    rename only ever publishes complete ones): it is not a checkpoint, so it is neither resumed
    from nor deleted by the retention of old checkpoints.
    """
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(path: Path) -> Optional[Path]:
    """``path`` itself when it is a checkpoint, else the newest checkpoint under ``path`` or ``path/checkpoints``."""
    if (path / STATE_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(root: Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Write a checkpoint atomically: ``write(tmp_dir)`` fills a temporary directory that is then renamed.

    Keeps the ``keep`` newest checkpoints and returns the new one's path.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"write_checkpoint: step must be an int >= 0; got {step!r}")
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    write(tmp)
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists() and not (final / STATE_FILE).is_file():
        # Not ours (our rename only publishes complete checkpoints): keep it, out of the way.
        aside = final.with_name(f"{final.name}.not-a-checkpoint-{os.getpid()}")
        os.replace(final, aside)
        print(f"grpo: {final} was not a checkpoint (no {STATE_FILE}); moved it to {aside}")
    if final.exists():  # the same step saved again (a resumed run): retire the old copy first
        _retire(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in list_checkpoints(root)[:-keep]:
        _retire(old)
    return final


def _retire(path: Path) -> None:
    """Delete a checkpoint without ever leaving a half-deleted directory under a ``step_*`` name."""
    trash = path.with_name(f".tmp-retired-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


def file_digest(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex digest}`` of a file, as state.json records it."""
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def write_state(d: Path, state: dict[str, Any]) -> None:
    """Write ``d/state.json`` last: ``state`` plus ``files``, the size and SHA-256 of every other file in d."""
    files = {f.name: file_digest(f) for f in sorted(d.iterdir()) if f.name != STATE_FILE}
    write_json(d / STATE_FILE, {**state, "files": files})


def read_state(ckpt: Path, verify_files: bool = True) -> dict[str, Any]:
    """The checkpoint's state.json with every field checked, and (``verify_files``) every file's checksum.

    Checked here: the format version (2, or 3 for DCP); exactly the fields of :data:`STATE_KEYS`
    (:data:`DCP_STATE_KEYS` for format 3, ``world_size`` an int >= 1); ``config`` is a
    valid :class:`TrainerConfig` with exactly its fields; ``step`` is an int in ``[0,
    config.steps]`` equal to the directory's ``step_<N>``; ``metadata``, ``scheduler`` and
    ``optimizer`` are objects (the trainer checks the last two against its live optimizer); each
    RNG state is one its generator accepts; ``files`` lists at least :data:`REQUIRED_FILES`, and
    each listed file exists with the recorded size and SHA-256 (:data:`DCP_REQUIRED_FILES` for
    format 3).

    Raises:
        CheckpointError: naming state.json (or the file whose checksum fails) and the field.
    """
    path = ckpt / STATE_FILE

    def bad(field: str, expected: str, got: Any) -> CheckpointError:
        return CheckpointError(f"{path}: {field} must be {expected}; got {_short(got)}")

    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(state, dict):
        raise bad("the top level", "a JSON object", state)
    fmt = state.get("format")
    if fmt not in (FORMAT_VERSION, DCP_FORMAT_VERSION) or isinstance(fmt, bool):
        old = " (format 1 was written before checksums were recorded)" if fmt == 1 else ""
        raise bad("format", f"{FORMAT_VERSION} (one process) or {DCP_FORMAT_VERSION} (torch.distributed.checkpoint), the "
                  f"versions this grpo_kernels reads{old}", fmt)
    keys = STATE_KEYS if fmt == FORMAT_VERSION else DCP_STATE_KEYS
    for key in keys:
        if key not in state:
            raise CheckpointError(f"{path}: {key} must be present; the field is missing")
    for key in state:
        if key not in keys:
            raise bad(key, "absent (not a checkpoint field: " + ", ".join(keys) + ")", state[key])
    if fmt == DCP_FORMAT_VERSION and not (_is_int(state["world_size"]) and state["world_size"] >= 1):
        raise bad("world_size", "an int >= 1", state["world_size"])
    for key in ("config", "metadata", "scheduler", "optimizer", "rng", "files"):
        if not isinstance(state[key], dict):
            raise bad(key, "a JSON object", state[key])

    config = _check_config(path, state["config"])
    step = state["step"]
    if not _is_int(step) or not 0 <= step <= config.steps:
        raise bad("step", f"an int in [0, config.steps = {config.steps}]", step)
    m = _NAME.match(ckpt.name)
    if m and int(m.group(1)) != step:
        raise bad("step", f"{int(m.group(1))}, the step in the directory's name", step)
    _check_rng(path, state["rng"])
    _check_files(ckpt, state["files"], verify_files, REQUIRED_FILES if fmt == FORMAT_VERSION else DCP_REQUIRED_FILES)
    return state


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 120 else text[:117] + "..."


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_config(path: Path, values: dict[str, Any]) -> TrainerConfig:
    names = [f.name for f in dataclasses.fields(TrainerConfig)]
    for key in values:
        if key not in names:
            raise CheckpointError(f"{path}: config.{key} is not a TrainerConfig field")
    for name in names:
        if name not in values:
            raise CheckpointError(f"{path}: config.{name} must be present; the field is missing")
    try:
        return TrainerConfig(**values)
    except (TypeError, ValueError) as exc:
        # The config's messages read "<Class>: <field> must be ...": name the field's place in the file.
        m = re.match(r"^\w+: (\w+) ", str(exc))
        where = f"config.{m.group(1)}" if m else "config"
        raise CheckpointError(f"{path}: {where}: {exc}") from exc


def _check_rng(path: Path, rng: dict[str, Any]) -> None:
    """Each saved RNG state is tried on a throwaway generator of its kind, so a bad one names its field."""
    allowed = ("python", "numpy", "torch", "generator", "cuda")
    for key in rng:
        if key not in allowed:
            raise CheckpointError(f"{path}: rng.{key} is not an RNG this trainer saves ({', '.join(allowed)})")
    for key in ("python", "numpy", "torch", "generator"):
        if key not in rng:
            raise CheckpointError(f"{path}: rng.{key} must be present; the field is missing")

    def bad(key: str, expected: str, exc: Optional[BaseException] = None) -> CheckpointError:
        why = f" ({exc})" if exc is not None else ""
        return CheckpointError(f"{path}: rng.{key} must be {expected}; got {_short(rng[key])}{why}")

    py = rng["python"]
    if not (isinstance(py, list) and len(py) == 3 and isinstance(py[1], list) and all(_is_int(v) for v in py[1])):
        raise bad("python", "[version, 625 ints, gauss] as random.getstate() gives")
    try:
        random.Random().setstate((py[0], tuple(py[1]), py[2]))
    except (TypeError, ValueError, OverflowError) as exc:
        raise bad("python", "a state random.setstate accepts", exc) from exc
    npy = rng["numpy"]
    if not (isinstance(npy, list) and len(npy) == 5 and isinstance(npy[1], list)
            and all(_is_int(v) and 0 <= v < 2**32 for v in npy[1])):
        raise bad("numpy", "[name, 624 uint32 keys, pos, has_gauss, cached] as numpy.random.get_state() gives")
    try:
        np.random.RandomState().set_state((npy[0], np.asarray(npy[1], dtype=np.uint32), *npy[2:]))
    except (TypeError, ValueError, OverflowError) as exc:
        raise bad("numpy", "a state numpy.random.set_state accepts", exc) from exc
    for key in ("torch", "generator"):
        try:
            torch.Generator().set_state(_unb64(rng[key]))
        except (TypeError, ValueError, RuntimeError, binascii.Error) as exc:
            raise bad(key, "a base64 torch.Generator state", exc) from exc
    if "cuda" in rng:
        cuda = rng["cuda"]
        if not isinstance(cuda, list):
            raise bad("cuda", "a list of base64 CUDA generator states")
        for s in cuda:
            try:
                _unb64(s)
            except (TypeError, ValueError, binascii.Error) as exc:
                raise bad("cuda", "a list of base64 CUDA generator states", exc) from exc


def _check_files(ckpt: Path, files: dict[str, Any], verify: bool, required: tuple[str, ...]) -> None:
    path = ckpt / STATE_FILE
    for name in required:
        if name not in files:
            raise CheckpointError(f"{path}: files must list {name}; it lists {sorted(files)}")
    for name, entry in files.items():
        if not isinstance(name, str) or name in ("", ".", "..", STATE_FILE) or "/" in name or "\\" in name:
            raise CheckpointError(f"{path}: files must name files of the checkpoint directory; got {_short(name)}")
        if not (isinstance(entry, dict) and set(entry) == {"bytes", "sha256"} and _is_int(entry["bytes"])
                and entry["bytes"] >= 0 and isinstance(entry["sha256"], str) and _SHA256.match(entry["sha256"])):
            raise CheckpointError(f"{path}: files.{name} must be {{\"bytes\": int, \"sha256\": 64 hex digits}}; "
                                  f"got {_short(entry)}")
    if not verify:
        return
    for name, entry in files.items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing, but {STATE_FILE} lists it")
        got = file_digest(f)
        if got != entry:
            raise CheckpointError(
                f"{f}: checksum mismatch ({got['bytes']} bytes, sha256 {got['sha256'][:16]}...; {STATE_FILE} records "
                f"{entry['bytes']} bytes, sha256 {entry['sha256'][:16]}...): the file is corrupted or was changed "
                "after the checkpoint was written")


def check_like(path: Path, field: str, got: Any, want: Any) -> None:
    """``got`` (read from JSON) has the structure of ``want`` (the live object's state).

    Same keys for dicts, same lengths for lists and tuples, same kinds of leaves (bool, str,
    None, or a finite number: int and float are interchangeable); the error names ``field``
    down to the offending leaf, e.g. ``optimizer.param_groups[0].lr``.
    """
    def bad(expected: str) -> CheckpointError:
        return CheckpointError(f"{path}: {field} must be {expected}; got {_short(got)}")

    if isinstance(want, dict):
        if not isinstance(got, dict):
            raise bad("a JSON object")
        for k in want:
            if str(k) not in got:
                raise CheckpointError(f"{path}: {field}.{k} must be present; the field is missing")
        names = {str(w) for w in want}
        for k in got:
            if k not in names:
                raise CheckpointError(f"{path}: {field}.{k} is not expected here (the fields are "
                                      f"{', '.join(map(str, want))})")
        for k, v in want.items():
            check_like(path, f"{field}.{k}", got[str(k)], v)
    elif isinstance(want, (list, tuple)):
        if not isinstance(got, list) or len(got) != len(want):
            raise bad(f"a list of {len(want)}")
        for i, (g, w) in enumerate(zip(got, want)):
            check_like(path, f"{field}[{i}]", g, w)
    elif want is None:
        if got is not None:
            raise bad("null")
    elif isinstance(want, bool):
        if not isinstance(got, bool):
            raise bad("true or false")
    elif isinstance(want, (int, float)):
        if not isinstance(got, (int, float)) or not is_real_number(got):  # 1e400 in a file: refused, no OverflowError
            raise bad("a finite number")
    elif isinstance(want, str):
        if not isinstance(got, str):
            raise bad("a string")
    else:  # a state the trainer never writes as JSON
        raise CheckpointError(f"{path}: {field} cannot be checked (a {type(want).__name__} in the live state)")


def check_range(path: Path, field: str, got: Any, ok: Callable[[Any], bool], expected: str) -> None:
    """Refuse ``got`` unless ``ok(got)``, naming ``field`` and what was ``expected``."""
    if not ok(got):
        raise CheckpointError(f"{path}: {field} must be {expected}; got {_short(got)}")


def _b64(t: Tensor) -> str:
    return base64.b64encode(t.contiguous().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> Tensor:
    if not isinstance(s, str):
        raise TypeError(f"expected a base64 string, got {type(s).__name__}")
    return torch.frombuffer(bytearray(base64.b64decode(s, validate=True)), dtype=torch.uint8)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG a training step draws from, as JSON: Python, NumPy, torch (CPU, CUDA) and ``generator``."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
        "generator": _b64(generator.get_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Restore what :func:`rng_state` saved."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    generator.set_state(_unb64(state["generator"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> dict[str, Any]:
    """Tensors of the optimizer state to ``path`` (safetensors); returns the rest as JSON-able data."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    save_file(tensors, str(path))
    return {"param_groups": sd["param_groups"], "scalars": scalars}


def check_scheduler(path: Path, saved: Any, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """A scheduler state read from ``path`` has the live scheduler's structure and sane values.

    Besides the structure (:func:`check_like`; a LambdaLR's ``lr_lambdas`` must be null, since a
    saved object there would be written into the closure), the counters are ints >= 0 and the
    learning rates finite, base rates > 0.
    """
    live = scheduler.state_dict()
    check_like(path, "scheduler", saved, live)
    for key, low in (("last_epoch", 0), ("_step_count", 1)):
        if key in live:
            check_range(path, f"scheduler.{key}", saved[key], lambda v, low=low: _is_int(v) and v >= low, f"an int >= {low}")
    for i, lr in enumerate(saved.get("base_lrs", [])):
        check_range(path, f"scheduler.base_lrs[{i}]", lr, lambda v: v > 0, "a number > 0")
    for i, lr in enumerate(saved.get("_last_lr", [])):
        check_range(path, f"scheduler._last_lr[{i}]", lr, lambda v: v >= 0, "a number >= 0")


def read_optimizer(path: Path, file: Path, optimizer: torch.optim.Optimizer, meta: Any) -> dict[str, Any]:
    """The optimizer state dict to load, from ``file`` (tensors) and ``meta`` (state.json's ``optimizer``).

    Checked against the live optimizer before anything is loaded: the param groups have its
    structure and parameter indices, their hyper-parameters are in range (lr >= 0, eps > 0,
    weight decay >= 0, betas in [0, 1)), every tensor is ``<param index>.<name>`` of a parameter
    that exists, has that parameter's shape (scalars excepted) and is finite.
    """
    live = optimizer.state_dict()
    check_like(path, "optimizer", {k: v for k, v in meta.items() if k != "scalars"}, {"param_groups": live["param_groups"]})
    if not isinstance(meta.get("scalars"), dict):
        raise CheckpointError(f"{path}: optimizer.scalars must be a JSON object; got {_short(meta.get('scalars'))}")
    ranges = {"lr": (lambda v: v >= 0, "a number >= 0"), "initial_lr": (lambda v: v > 0, "a number > 0"),
              "eps": (lambda v: v > 0, "a number > 0"), "weight_decay": (lambda v: v >= 0, "a number >= 0")}
    for i, (group, want) in enumerate(zip(meta["param_groups"], live["param_groups"])):
        where = f"optimizer.param_groups[{i}]"
        check_range(path, f"{where}.params", group["params"], lambda v, w=want["params"]: v == w,
                    f"{want['params']}, this optimizer's parameter indices")
        for key, (ok, expected) in ranges.items():
            if key in group:
                check_range(path, f"{where}.{key}", group[key], ok, expected)
        for j, beta in enumerate(group.get("betas", [])):
            check_range(path, f"{where}.betas[{j}]", beta, lambda v: 0 <= v < 1, "a number in [0, 1)")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for idx, st in meta["scalars"].items():
        if not (idx.isdigit() and int(idx) < len(params) and isinstance(st, dict)):
            raise CheckpointError(f"{path}: optimizer.scalars.{idx} must be an object for a parameter index below "
                                  f"{len(params)}; got {_short(st)}")
        for k, v in st.items():
            if not (v is None or isinstance(v, (bool, str)) or (isinstance(v, (int, float)) and is_real_number(v))):
                raise CheckpointError(f"{path}: optimizer.scalars.{idx}.{k} must be a finite number, true/false, a "
                                      f"string or null; got {_short(v)}")
        state.setdefault(int(idx), {}).update(st)
    for key, t in load_file(str(file)).items():
        idx, _, name = key.partition(".")
        if not (idx.isdigit() and int(idx) < len(params) and name):
            raise CheckpointError(f"{file}: tensor {key!r} is not '<parameter index>.<state name>' for this optimizer's "
                                  f"{len(params)} parameters")
        p = params[int(idx)]
        if t.dim() > 0 and t.shape != p.shape:
            raise CheckpointError(f"{file}: tensor {key!r} has shape {list(t.shape)}; its parameter has {list(p.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{file}: tensor {key!r} holds non-finite values")
        state.setdefault(int(idx), {})[name] = t
    names = {frozenset(st) for st in state.values()}
    if len(names) > 1:
        raise CheckpointError(f"{file}: parameters hold different optimizer states ({sorted(map(sorted, names))})")
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def read_weights(file: Path, model: torch.nn.Module) -> dict[str, Tensor]:
    """The tensors of a model file, checked to be exactly this model's: names, shapes and dtypes.

    A tensor the file leaves out is allowed only when it is tied to one it has (save_model writes
    tied weights once). Load the result with ``model.load_state_dict(tensors, strict=False)``.
    """
    tensors = load_file(str(file))
    live = model.state_dict()
    for key, t in tensors.items():
        if key not in live:
            raise CheckpointError(f"{file}: tensor {key!r} is not a parameter or buffer of this {type(model).__name__}")
        if t.shape != live[key].shape or t.dtype != live[key].dtype:
            raise CheckpointError(f"{file}: tensor {key!r} is {t.dtype} {list(t.shape)}; the model's is "
                                  f"{live[key].dtype} {list(live[key].shape)}")
    stored = {live[key].data_ptr() for key in tensors}
    for key, t in live.items():
        if key not in tensors and t.data_ptr() not in stored:
            raise CheckpointError(f"{file}: has no tensor {key!r}, which this {type(model).__name__} has")
    return tensors


# ---------------------------------------------------------------- format 3: torch.distributed.checkpoint

# What DCP's .metadata pickle may build: its own metadata classes, torch sizes, dtypes and layouts, paths.
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        ok = name in _DCP_CLASSES.get(module, ()) or (
            module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
        if not ok:
            raise pickle.UnpicklingError(f"{module}.{name} is not a class of DCP's checkpoint metadata")
        return super().find_class(module, name)


def _reader(ckpt: Path) -> Any:
    """A DCP FileSystemReader of ``ckpt`` whose .metadata is unpickled with :class:`_MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = Path(self.path) / ".metadata"
            try:
                with path.open("rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{path}: not a torch.distributed.checkpoint index this trainer reads ({exc})") from exc
            from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

            if not isinstance(metadata, Metadata):
                raise CheckpointError(f"{path}: not a torch.distributed.checkpoint index; got {type(metadata).__name__}")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(ckpt))


def save_dcp(d: Path, state: dict[str, Any]) -> None:
    """Every rank writes its shards of ``state`` (model, optimizer, reference state dicts) into ``d``: collective."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(d)))


def load_dcp(ckpt: Path, state: dict[str, Any]) -> None:
    """Load a format 3 checkpoint into ``state`` in place, resharded to this run's layout (one process: no collectives).

    DCP plans the whole load (every key present, every global shape equal) before it reads a tensor.

    Raises:
        CheckpointError: naming the checkpoint and DCP's reason (a missing tensor, a shape mismatch).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=_reader(ckpt), no_dist=not (dist.is_available() and dist.is_initialized()))
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:  # DCP wraps every rank's failure in a CheckpointException
        inner = re.sub(r"\s+", " ", str(exc))  # (a BaseException); its text holds each rank's traceback
        reason = re.findall(r"(?:ValueError|RuntimeError|KeyError): ([^\n]*?)(?= File |$)", inner) or [inner]
        raise CheckpointError(f"{ckpt}: the DCP tensors do not fit this run's model and optimizer "
                              f"({reason[-1][:300]})") from exc


def state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                ref_model: Optional[torch.nn.Module]) -> dict[str, Any]:
    """Model, optimizer (keyed by parameter name) and reference state dicts in the run's layout (DTensor shards
    under FSDP2), as DCP saves and loads them."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model_sd, optimizer_sd = get_state_dict(model, optimizer)
    out = {"model": model_sd, "optimizer": optimizer_sd}
    if ref_model is not None:
        out["ref_model"] = get_model_state_dict(ref_model)
    return out


def load_state_dicts(ckpt: Path, state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     ref_model: Optional[torch.nn.Module]) -> None:
    """Model, reference and optimizer from a format 3 checkpoint (into any world size, one process included), or
    from a format 2 one into a data-parallel run; checked before anything is loaded.

    ``state`` is the checkpoint's :func:`read_state`. Format 3: state.json's optimizer groups must
    have the live optimizer's structure and parameter names, then DCP plans the load (names, global
    shapes) and reshards. Format 2: the one-process checks (:func:`read_optimizer`,
    :func:`read_weights`) on the full tensors, which each rank then shards (FSDP2) or keeps (DDP).

    Raises:
        CheckpointError: naming the file and the field, or DCP's reason.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    state_path = ckpt / STATE_FILE
    if ref_model is not None and not (state["config"]["beta"] > 0):
        raise CheckpointError(f"{ckpt}: has no reference model (saved with beta = 0) but this run has a reference model "
                              "(beta > 0)")
    live = state_dicts(model, optimizer, ref_model)
    names = [n for g in live["optimizer"]["param_groups"] for n in g["params"]]
    if state["format"] == DCP_FORMAT_VERSION:
        saved = state["optimizer"]
        check_like(state_path, "optimizer", saved, {"param_groups": live["optimizer"]["param_groups"]})
        for i, (group, want) in enumerate(zip(saved["param_groups"], live["optimizer"]["param_groups"])):
            check_range(state_path, f"optimizer.param_groups[{i}].params", group["params"],
                        lambda v, w=want["params"]: v == w, "this optimizer's parameter names")
        load_dcp(ckpt, live)  # in place, resharded to this run's layout
        set_state_dict(model, optimizer, model_state_dict=live["model"], optim_state_dict=live["optimizer"])
        if ref_model is not None:
            set_model_state_dict(ref_model, live["ref_model"])
        return
    full_optimizer = read_optimizer(state_path, ckpt / "optimizer.safetensors", optimizer, state["optimizer"])
    weights = read_weights(ckpt / "model.safetensors", model)
    ref_weights = None if ref_model is None else read_weights(ckpt / "ref_model.safetensors", ref_model)
    groups, at = [], 0
    for g in full_optimizer["param_groups"]:  # parameter indices -> names
        groups.append(dict(g, params=names[at: at + len(g["params"])]))
        at += len(g["params"])
    full = StateDictOptions(full_state_dict=True, strict=False)  # strict=False: tied weights are stored once
    set_state_dict(model, optimizer, model_state_dict=weights, options=full,
                   optim_state_dict={"state": {names[i]: st for i, st in full_optimizer["state"].items()},
                                     "param_groups": groups})
    if ref_weights is not None:
        set_model_state_dict(ref_model, ref_weights, options=full)
