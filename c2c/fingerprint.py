"""Content fingerprints: what a cached result was computed from (files, models, fusers, tokenizers, code).

Every cache of the project (evaluation records, finished training runs, converted models, KV prefix
caches) is keyed by these, never by names or paths:

* ``file_sha256(path)``: a file's SHA-256, memoised in a hidden sidecar next to it
  (``.<name>.c2c-sha256``, or under ``cache_dir()/sha256`` when the folder is read-only) and reused
  while the file's size and mtime_ns are unchanged. As in git's "racily clean" rule, a memo taken
  less than ``RACY_NS`` after the file's mtime is not trusted (a write within the same clock tick
  would keep the mtime), so such a file is hashed again next time;
* ``paths_sha256(paths)``: one hash over files and folders (their non-hidden files, recursively);
* ``model_fingerprint(model)``: a transformers model's config, weights and dtypes. A model loaded from
  a folder of safetensors and not changed in place since (every tensor's ``_version`` is 0) is hashed
  from those files (``file_sha256``: once per file); any other is hashed from its tensors in memory.
  Memoised per model object while its tensors are unchanged, so a second call is cheap;
* ``fuser_fingerprint(fuser)``: a fuser's config and weights (and persistent buffers);
* ``tokenizer_fingerprint(tokenizer)``: vocabulary, merges, special tokens and chat template;
* ``code_version(*modules)``: the source of the modules that determine a result, as parsed code
  (comments, docstrings and formatting do not count).

Also here: ``write_manifest`` / ``verify_manifest`` (SHA-256 of every file of a built folder, recorded
when it is built, checked before it is used) and ``check_finite`` (NaN/inf guard with a message that
names the tensor).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import os
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType

import torch
from safetensors import safe_open

from c2c.paths import cache_dir

CHUNK = 1 << 20  # 1 MiB reads
SIDECAR_SUFFIX = ".c2c-sha256"  # hidden sidecar `.<name>.c2c-sha256` next to a hashed file
RACY_NS = 2_000_000_000  # a memo is trusted only if taken this long after the file's mtime (coarse clocks, FAT)


# --------------------------------------------------------------------------- files


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}{SIDECAR_SUFFIX}")


def _cache_record(path: Path) -> Path:
    key = hashlib.sha256(str(path).encode()).hexdigest()
    return cache_dir() / "sha256" / f"{key}.json"


def _read_memo(record: Path, path: Path, stat: os.stat_result) -> str | None:
    try:
        memo = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if (isinstance(memo, dict) and memo.get("path") == str(path) and memo.get("size") == stat.st_size
            and memo.get("mtime_ns") == stat.st_mtime_ns and isinstance(memo.get("sha256"), str)
            and memo.get("hashed_at_ns", 0) - stat.st_mtime_ns >= RACY_NS):
        return memo["sha256"]
    return None


def _write_memo(record: Path, memo: dict) -> None:
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f"{record.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(memo) + "\n")
    tmp.replace(record)


def sha256_of_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (no memo)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, hashed once and reused while its size and mtime_ns are unchanged.

    The memo is a hidden sidecar next to the file, or a record under ``cache_dir()/sha256`` where the
    folder is not writable. Symbolic links are followed (the memo sits next to the link).
    """
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise FileNotFoundError(f"cannot hash {path}: no such file")
    stat = path.stat()
    for record in (_sidecar(path), _cache_record(path)):
        sha = _read_memo(record, path, stat)
        if sha is not None:
            return sha
    hashed_at = time.time_ns()
    sha = sha256_of_file(path)
    after = path.stat()
    if (after.st_size, after.st_mtime_ns) != (stat.st_size, stat.st_mtime_ns):
        raise RuntimeError(f"{path} changed while it was being hashed; retry when nothing writes to it")
    memo = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "hashed_at_ns": hashed_at,
            "sha256": sha}
    try:
        _write_memo(_sidecar(path), memo)
    except OSError:  # read-only folder: keep the memo in the cache folder
        _write_memo(_cache_record(path), memo)
    return sha


def _files_under(folder: Path) -> list[Path]:
    """Non-hidden files below a folder (hidden ones: sidecars, locks, .git), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return out


def paths_sha256(paths: Iterable[str | os.PathLike]) -> str:
    """One hex SHA-256 over files and folders: each file's name (relative to the path given) and content."""
    digest = hashlib.sha256()
    for given in paths:
        given = Path(given)
        if not given.exists():
            raise FileNotFoundError(f"cannot hash {given}: no such file or folder")
        files = [given] if given.is_file() else _files_under(given)
        for f in files:
            name = f.name if f == given else f.relative_to(given).as_posix()
            digest.update(f"{name}\0{file_sha256(f)}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- built folders


def write_manifest(folder: str | os.PathLike, *, exclude: Iterable[str] = ()) -> dict[str, str]:
    """SHA-256 of every non-hidden file of a folder (relative path -> hex), for ``verify_manifest``."""
    folder = Path(folder)
    skip = set(exclude)
    return {f.relative_to(folder).as_posix(): file_sha256(f) for f in _files_under(folder)
            if f.relative_to(folder).as_posix() not in skip}


def verify_manifest(folder: str | os.PathLike, manifest: Mapping[str, str]) -> list[str]:
    """Problems of a folder against its recorded manifest (missing or changed files); [] if it matches."""
    folder = Path(folder)
    problems = []
    for name, sha in sorted(manifest.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif file_sha256(path) != sha:
            problems.append(f"{path} has changed (SHA-256 {file_sha256(path)[:12]}..., recorded {sha[:12]}...)")
    return problems


# --------------------------------------------------------------------------- tensors, models, fusers


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 over named tensors: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        digest.update(_tensor_bytes(t))
    return digest.hexdigest()


# module -> (state key, fingerprint); a state key changes when any tensor is replaced or changed in place
_MEMO: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def _state_key(state: Mapping[str, torch.Tensor]) -> tuple:
    return tuple((name, id(t), t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for name, t in state.items())


def _memoised(module: torch.nn.Module, compute) -> str:
    state = module.state_dict(keep_vars=True)
    key = _state_key(state)
    memo = _MEMO.get(module)
    if memo is not None and memo[0] == key:
        return memo[1]
    fingerprint = compute(state)
    _MEMO[module] = (key, fingerprint)
    return fingerprint


def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _weights_from_files(model, state: Mapping[str, torch.Tensor]) -> list[Path] | None:
    """The safetensors files ``model`` was loaded from, if its tensors are exactly those (else None).

    True when the model's folder holds safetensors covering every tensor of the state dict (tied
    tensors share storage with one that is stored) and no tensor was changed in place since loading.
    """
    folder = Path(str(getattr(model, "name_or_path", "") or ""))
    if not folder.is_dir() or any(t._version for t in state.values()):
        return None
    files = _safetensors_files(folder)
    if not files:
        return None
    stored = set()
    for f in files:
        with safe_open(str(f), "pt") as handle:
            stored.update(handle.keys())
    pointers = {state[name].data_ptr() for name in state if name in stored}
    if any(name not in stored and t.data_ptr() not in pointers for name, t in state.items()):
        return None
    return files


def _json(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def model_fingerprint(model) -> str:
    """Hex SHA-256 of a loaded transformers model: its config (without its path), weights and dtypes.

    Weights: the safetensors files it was loaded from (hashed once, memo beside the files) when it
    is unchanged since loading; else its tensors in memory. Memoised per model object.
    """

    def compute(state):
        config = model.config.to_dict()
        config.pop("_name_or_path", None)
        dtypes = sorted({str(t.dtype) for t in state.values()})
        files = _weights_from_files(model, state)
        weights = "files:" + paths_sha256(files) if files else "tensors:" + tensors_sha256(state)
        return hashlib.sha256(_json({"class": type(model).__name__, "config": config, "dtypes": dtypes,
                                     "weights": weights}).encode()).hexdigest()

    return _memoised(model, compute)


def fuser_fingerprint(fuser) -> str:
    """Hex SHA-256 of a fuser's config and weights (persistent buffers included). Memoised per object
    while its tensors are unchanged (an optimizer step or ``load_state_dict`` changes them)."""

    def compute(state):
        return hashlib.sha256(_json({"class": type(fuser).__name__, "config": fuser.config.to_dict(),
                                     "weights": tensors_sha256(state)}).encode()).hexdigest()

    return _memoised(fuser, compute)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of a tokenizer's vocabulary/merges/specials and chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    digest.update(vocabulary.encode())
    digest.update(str(tokenizer.chat_template).encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- code


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def code_version(*modules: str | ModuleType) -> str:
    """16 hex digits naming the code of these modules (objects or dotted names, e.g. "c2c.methods").

    Computed from each module's parsed source without docstrings, so comments, docstrings and
    formatting do not change it; any change to the code does.
    """
    if not modules:
        raise ValueError("code_version() needs at least one module")
    digest = hashlib.sha256()
    for module in sorted(modules, key=lambda m: m if isinstance(m, str) else m.__name__):
        module = importlib.import_module(module) if isinstance(module, str) else module
        tree = _without_docstrings(ast.parse(inspect.getsource(module)))
        digest.update(f"{module.__name__}\0{ast.dump(tree)}\n".encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- numbers


def check_finite(tensor: torch.Tensor, what: str, hint: str = "") -> torch.Tensor:
    """Return ``tensor`` if every value is finite; else raise FloatingPointError naming ``what``.

    One reduction and one host synchronisation. hint: what to do about it (appended to the message).
    """
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise FloatingPointError(f"{what} holds {bad} NaN/inf value(s) of {tensor.numel()}"
                                 + (f"; {hint}" if hint else ""))
    return tensor
