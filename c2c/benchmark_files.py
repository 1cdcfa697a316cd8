"""Benchmark records from local files, before any benchmark's rules apply (those are `c2c.benchmarks`').

A source is a file or a folder. Files: ``.jsonl`` / ``.jsonl.gz`` / ``.json`` / ``.parquet`` / ``.arrow`` /
``.csv``; a ``datasets.save_to_disk`` folder (``state.json`` + Arrow files) is read as one unit. Which split
a unit holds is what its ``state.json``, an OLMo ``config.json`` next to it, or its path names
(``select_units``). OLMo's evaluation requests (``requests.jsonl.gz``: one line per document and choice)
are reduced to their distinct documents (``olmo_docs``).

    for unit, split in select_units(source, "test", explicit_split=False):
        rows = read_unit(unit)  # list[dict], no interpretation yet
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SPLIT_NAMES = {  # split -> the names that mean it ("auxiliary_train" before "train")
    "auxiliary_train": {"auxiliary_train"}, "train": {"train"}, "validation": {"validation", "val"},
    "val": {"validation", "val"}, "dev": {"dev"}, "test": {"test"},
}
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".arrow", ".csv")
METADATA_NAMES = {"state.json", "dataset_info.json", "dataset_dict.json", "config.json"}


def record_field(rec: dict, name: str, where: str) -> Any:
    """``rec[name]``; a ValueError naming ``where`` (file and record), the field and the fields there otherwise."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a record (JSON object), got {type(rec).__name__}")
    if name not in rec:
        raise ValueError(f"{where}: record has no field {name!r} (fields: {sorted(rec)})")
    return rec[name]


def record_text(value: Any, name: str, where: str) -> str:
    """Field ``name``'s value as stripped text; a ValueError unless it is a non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _is_data_file(path: Path) -> bool:
    return path.name.endswith(DATA_SUFFIXES) and path.name not in METADATA_NAMES


def read_arrow(path: Path) -> list[dict]:
    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()  # datasets' save_to_disk format
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
    return table.to_pylist()


def _read_json_lines(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
    return rows


def read_file(path: Path) -> list[dict]:
    """All records of one data file, as dicts (no interpretation yet)."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_json_lines(path)
    if name.endswith(".json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:  # many hub ".json" files are JSON lines
            return _read_json_lines(path)
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        return data
    if name.endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    if name.endswith(".arrow"):
        return read_arrow(path)
    if name.endswith(".csv"):
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"{path}: unsupported file type (use one of {', '.join(DATA_SUFFIXES)})")


def _split_of_name(name: str) -> str | None:
    """The split a file or folder name announces: "test", "val.jsonl", "test-00000-of-00001.parquet",
    "accountant_val.csv", "data/validation" ... or None."""
    stem = name.split(".")[0].lower()
    for split in SPLIT_NAMES:
        if stem == split or stem.startswith(split + "-") or stem.endswith("_" + split):
            return split
    return None


def split_of(path: Path, root: Path) -> str | None:
    """The split of a data file or save_to_disk folder: its state.json, the olmo config.json next
    to a requests file, else the innermost path part (below ``root``) that names one."""
    folder = path if path.is_dir() else path.parent
    state = folder / "state.json"
    if state.is_file():
        split = json.loads(state.read_text()).get("_split")
        if split:
            return str(split)
    config = folder / "config.json"
    if path.name == "requests.jsonl.gz" and config.is_file():
        split = json.loads(config.read_text()).get("task_config", {}).get("split")
        if split:
            return str(split)
    parts = path.relative_to(root).parts if path != root else (path.name,)
    for part in reversed(parts):
        split = _split_of_name(part)
        if split is not None:
            return split
    return None


def _same_split(a: str | None, b: str) -> bool:
    return a is not None and a in SPLIT_NAMES.get(b, {b})


def list_units(root: Path) -> list[Path]:
    """The readable units under a folder: save_to_disk folders (holding state.json) and data
    files elsewhere, in sorted order."""
    if (root / "state.json").is_file():
        return [root]
    units = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        if (here / "state.json").is_file():
            units.append(here)
            dirnames[:] = []  # the arrow files inside belong to this unit
            continue
        units.extend(here / f for f in sorted(filenames) if _is_data_file(here / f))
    return units


def read_unit(unit: Path) -> list[dict]:
    """All records of one unit (a data file, or a save_to_disk folder), as dicts (no interpretation yet)."""
    if unit.is_dir():  # save_to_disk folder: its data files, in the order state.json lists them
        state = json.loads((unit / "state.json").read_text())
        files = [unit / d["filename"] for d in state.get("_data_files", [])] or sorted(
            unit.glob("*.arrow"))
        rows = []
        for f in files:
            rows.extend(read_arrow(f))
        return rows
    return read_file(unit)


def select_units(source: Path, split: str, explicit_split: bool) -> list[tuple[Path, str | None]]:
    """The units of ``source`` that hold ``split``, each with the split it announced."""
    if source.is_file() or (source / "state.json").is_file():  # one file / save_to_disk folder
        found = split_of(source, source.parent)
        if explicit_split and found is not None and not _same_split(found, split):
            raise ValueError(f"{source} holds split {found!r}, but split={split!r} was asked for")
        return [(source, found)]
    units = [(u, split_of(u, source)) for u in list_units(source)]
    if not units:
        raise FileNotFoundError(
            f"no data files ({', '.join(DATA_SUFFIXES)} or save_to_disk folders) under {source}")
    if all(s is None for _, s in units):
        return units
    unlabelled = [str(u) for u, s in units if s is None]
    if unlabelled:
        raise ValueError(f"{source}: some files name a split and some do not, so which split "
                         f"they hold is unclear: {unlabelled[:5]}")
    chosen = [(u, s) for u, s in units if _same_split(s, split)]
    if not chosen:
        raise FileNotFoundError(f"no files for split {split!r} under {source}; splits found: "
                                f"{sorted({s for _, s in units})}")
    return chosen


# OLMo's evaluation requests (oe-eval): one line per (document, choice) pair; the document
# {"id", "query": "Question: ...\nAnswer:", "choices": [texts] | [letters], "gold": int} repeats.


def is_olmo_request(rec: Any) -> bool:
    return isinstance(rec, dict) and "doc" in rec and "request_type" in rec


def olmo_docs(rows: list[dict], where: str) -> list[dict]:
    """The distinct documents of a requests file, in order (repeats must be identical). A document
    is known by its ``id``, or by its ``index`` where it has none (MedQA)."""
    docs: dict[str, dict] = {}
    for i, row in enumerate(rows, 1):
        doc = record_field(row, "doc", f"{where}:{i}")
        name = "index" if isinstance(doc, dict) and "id" not in doc and "index" in doc else "id"
        key = str(record_field(doc, name, f"{where}:{i} (doc)"))
        if key in docs and docs[key] != doc:
            raise ValueError(f"{where}:{i}: document {key!r} appears twice with different content")
        docs.setdefault(key, doc)
    return list(docs.values())
