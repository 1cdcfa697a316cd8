"""What an evaluation left, for the analyses that read it: per-item records, and the config's methods rebuilt.

``c2c.evaluate.run_eval`` writes ``<out>/eval/<method key>/<benchmark>.jsonl``, one record per item (id,
subject, gold, pred, correct, scores, ...). The analyses (answer overlap, MMLU subcategories) read those
files and never write them; the ones that score new variants of a method (a partly fused cache, a
checkpoint) rebuild the config's methods and items here, with the models loaded once and the prompt
caches attached as the config says.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from collections.abc import Sequence

from c2c.benchmarks import BenchmarkItems, MCItem, load_benchmark, resolve_source
from c2c.eval_config import load_eval_config
from c2c.evaluate import _Models, build_method
from c2c.fused import FusedInputs
from c2c.jsonl import read_jsonl
from c2c.methods import C2C, Method, chat_messages, letter_scoring
from c2c.paths import repo_relative


def records_path(out: str | os.PathLike, key: str, benchmark: str) -> Path:
    """Where ``run_eval`` keeps the records of method ``key`` on ``benchmark`` in its run folder ``out``."""
    return Path(out) / "eval" / key / f"{benchmark}.jsonl"


def method_records(out: str | os.PathLike, key: str, benchmark: str) -> list[dict]:
    """The per-item records of one method on one benchmark (read only: another run may be appending).

    An item whose method raised is in the records as wrong (``correct`` false), as in the main table.
    """
    path = records_path(out, key, benchmark)
    if not path.is_file():
        raise FileNotFoundError(f"no records of method {key!r} on {benchmark!r}: {path} does not exist. Run the "
                                "evaluation that writes them first (notebook 04, or python -m c2c.evaluate --config "
                                "<its config>), or fix the method key / run folder in the profile's parameters")
    records = read_jsonl(path, fix=f"delete {path} and re-run the evaluation")
    if not records:
        raise ValueError(f"{path} holds no records; re-run the evaluation")
    return records


def recorded_fingerprints(out: str | os.PathLike, key: str, benchmark: str) -> dict:
    """The content fingerprints (models, tokenizers, fusers, data, code) the records of a method were computed
    under, from the ``.meta.json`` beside them: compare with ``Method.fingerprints()`` before mixing a rebuilt
    method's answers with them."""
    path = records_path(out, key, benchmark).with_suffix(".meta.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the records of {key!r} on {benchmark!r} have no provenance")
    return json.loads(path.read_text())["fingerprints"]


def same_setup(method: Method, out: str | os.PathLike, key: str, benchmark: str) -> bool:
    """Whether a method computes with the very models, tokenizers and fusers that wrote these records."""
    recorded = recorded_fingerprints(out, key, benchmark)
    return all(recorded.get(name) == json.loads(json.dumps(value)) for name, value in method.fingerprints().items())


def correct_by_id(records: list[dict]) -> dict[str, bool]:
    """item id -> answered correctly."""
    return {r["id"]: bool(r["correct"]) for r in records}


def config_methods(config: str | os.PathLike | dict, keys: list[str], *, prefix_cache: bool | None = None,
                   fuser_checkpoint: str | os.PathLike | None = None) -> dict[str, Method]:
    """The methods of an eval config with these keys, built as ``run_eval`` builds them (one load per model).

    prefix_cache: override the config's (False for timing: caches must be computed, not read from disk).
    fuser_checkpoint: a fuser folder that replaces the fuser of every C2C method built (an evaluation run with
    such an override, e.g. notebook 04 with notebook 03's fuser, is read back with the same one).
    """
    cfg = load_eval_config(config)
    if prefix_cache is not None:
        cfg["prefix_cache"] = prefix_cache
    entries = {entry["key"]: entry for entry in cfg["methods"]}
    missing = [key for key in keys if key not in entries]
    if missing:
        raise ValueError(f"methods {missing} are not in the eval config; its method keys: {list(entries)}")
    if fuser_checkpoint is not None:
        for key in keys:
            if entries[key]["name"] == "c2c":
                entries[key] = {**entries[key], "fuser": {"checkpoint": repo_relative(fuser_checkpoint)}}
    models = _Models(cfg)
    return {key: build_method(entries[key], cfg, models) for key in keys}


def config_items(config: str | os.PathLike | dict, benchmark: str, out: str | os.PathLike,
                 limit: int | None = None) -> BenchmarkItems:
    """The items of one benchmark of an eval config, loaded as ``run_eval`` loads them (its source, split,
    subjects and limit; ``limit`` here, if given, overrides it). out: where tiny fixtures are written."""
    cfg = load_eval_config(config)
    entry = next((b for b in cfg["benchmarks"] if b["name"] == benchmark), None)
    if entry is None:
        raise ValueError(f"benchmark {benchmark!r} is not in the eval config; it has "
                         f"{[b['name'] for b in cfg['benchmarks']]}")
    source = resolve_source(entry["source"], benchmark, Path(out))
    return load_benchmark(benchmark, source, split=entry["split"], limit=limit or entry["limit"],
                          subjects=entry["subjects"])


def fused_inputs(method: C2C, items: Sequence[MCItem]) -> FusedInputs:
    """The fused prompts of these items as the method scores them (with "logits" scoring, its assistant prefix is
    part of the prompt), on the receiver's device: the prompts whose caches its evaluation computed (and, with
    prefix_cache, stored)."""
    prefix = ""
    if method.scoring == "logits":
        prefix = letter_scoring(method.model.receiver_tokenizer, method.assistant_prefix).prefix
    return method.prepare([chat_messages(item) for item in items], prefix).to(method.model.receiver.device)
