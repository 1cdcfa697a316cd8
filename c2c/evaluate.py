"""Evaluate methods on benchmarks: per-item results on disk, resumable, fail-loud; the main table written from
them (``c2c.main_table``).

Run folder layout (``out``)::

    main_table.csv / main_table.md  methods x benchmarks (+ average), N, parse failures, items/s
    main_table.json                 the same numbers, machine-readable, with parse-failure examples
    eval_config.yaml                the exact (resolved) config that produced the table, with the command
    eval/<method key>/<benchmark>.jsonl      one JSON record per item, appended batch by batch (fsync'ed)
    eval/<method key>/<benchmark>.meta.json  what produced them (method description, benchmark source,
                                             content fingerprints)

Resume: items already in the JSONL are skipped; a crash loses at most the batch in flight (a torn
last line is dropped). A JSONL written by a different method description or benchmark source, or
under other content fingerprints (each model's config/weights/dtype, tokenizers, the fuser's config
and weights, the benchmark's records, the code in ``EVAL_CODE``; ``c2c.fingerprint``), is never
mixed in: the run stops and says what changed. The run folder (and each method folder given to
``evaluate``) is locked while a run writes it: a second run on it stops, naming the first's pid.
Nothing is skipped silently: an unparsable reply is a wrong answer (counted and shown per
benchmark); so is an item whose method raises: its record holds
``"error": "<Type>: <message>"``, the table counts and shows the errors per benchmark, and a rerun
retries those items. Failures that look systematic stop the run with an ``EvaluationError`` naming
the items: the first ``FIRST_ITEMS_ALL_FAILED`` items all raised, or more than ``MAX_ERROR_FRACTION``
of the items did once ``ERROR_FRACTION_MIN_ITEMS`` have run.

Command line::

    python -m c2c.evaluate --config configs/eval_tiny.yaml [--out DIR] [--limit N] [--batch-size B]
    python -m c2c.evaluate --config configs/eval_tiny.yaml --table-only   # the table from the records, no model

From Python / a notebook: ``run_eval("configs/eval_tiny.yaml", out=...)`` or, for a method object
you built yourself, ``evaluate(method, items, folder)``.

Config keys (YAML): ``c2c.eval_config`` (``DEFAULTS``, ``load_eval_config``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
import yaml
from tqdm.auto import tqdm

from c2c.align import DEFAULT_ALIGNMENT
from c2c.benchmarks import MCItem, load_benchmark, mc_prompt, resolve_source
from c2c.checkpoint import PUBLISHED_CONFIG_NAME, load_fuser
from c2c.eval_config import EVAL_CONFIG, STATIC_CACHE, load_eval_config, read_raw_config
from c2c.fingerprint import code_version
from c2c.fused import C2CModel
from c2c.fuser import CONFIG_NAME, FuserConfig, random_fuser
from c2c.jsonl import append_jsonl, read_jsonl
from c2c.locks import FolderInUseError, folder_lock
from c2c.main_table import EXAMPLES_SHOWN, BenchmarkResult, EvalReport
from c2c.mcmix import HELD_OUT_BENCHMARK, load_mc_mix_held_out, trained_items_among
from c2c.methods import C2C, METHODS, SCORING_MODES, Method, ReceiverAlone, SharerAlone, TextToText
from c2c.models import load_model
from c2c.paths import repo_path, repo_relative
from c2c.prefixes import PrefixStore
from c2c.train_config import load_train_config

log = logging.getLogger(__name__)

# The code that determines an answer (prompts, answer extraction, the benchmark records read, letter scoring, the
# decode engine, token alignment, the fuser): a change to it makes cached records stale (``code_version``)
EVAL_CODE = ("c2c.benchmarks", "c2c.benchmark_files", "c2c.methods", "c2c.fused", "c2c.align", "c2c.fuser")
# an item that raises is counted wrong; these stop the run as systematic (items run by this call, longest first):
FIRST_ITEMS_ALL_FAILED = 20  # the first 20 items (all of them, if fewer) all raised
MAX_ERROR_FRACTION = 0.01  # more than 1% of the items raised ...
ERROR_FRACTION_MIN_ITEMS = 100  # ... once at least 100 have run


class EvaluationError(RuntimeError):
    """The run stops (results so far are kept): failures look systematic, or a method broke its contract;
    the message names the items."""


# --------------------------------------------------------------------------- one method, one benchmark


def read_records(path: Path) -> list[dict]:
    """The records of a results file. A torn last line (a crash mid-write) is dropped from the file."""
    records, seen = read_jsonl(path, repair=True), set()
    for number, record in enumerate(records, 1):
        if record["id"] in seen:
            raise ValueError(f"{path}: item {record['id']!r} appears twice (record {number}); delete the file to "
                             "redo it")
        seen.add(record["id"])
    return records


def _flat(meta: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out = {}
    for k, v in meta.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _short(value):
    return [_short(v) for v in value] if isinstance(value, list) else value[:12] if isinstance(value, str) else value


def _what_changed(key: str, old, new) -> str:
    """One line of the refusal: which fingerprint or setting differs, and what that means."""
    if not key.startswith("fingerprints."):
        return f"{key}: was {old!r}, now {new!r}"
    part = key.split(".", 1)[1]
    if part == "code":
        meaning = f"the prompt/scoring code changed ({', '.join(EVAL_CODE)})"
    elif part == "data":
        meaning = "the benchmark's records changed"
    elif part.endswith(("tokenizer", "tokenizers")):
        meaning = f"the {part.replace('_', ' ')} changed"
    elif part == "fusers":
        meaning = "the fuser's weights or config changed (e.g. retrained in place)"
    else:  # model, receiver, sharer, sharers
        model = "model" if part == "model" else part.rstrip("s") + " model"
        meaning = f"the {model}'s config, weights or dtype changed"
    return f"{meaning} ({key} was {_short(old)}, now {_short(new)})"


def _check_meta(path: Path, meta: dict, records_path: Path) -> None:
    """Write the provenance of a results file, or check that an existing one matches (else refuse, saying
    what changed: a setting, or the content fingerprint of a model, tokenizer, fuser, the data or the code)."""
    meta = json.loads(json.dumps(meta))  # normalised (tuples -> lists)
    if path.exists():
        old = json.loads(path.read_text())
        if old != meta:
            if "fingerprints" not in old:
                detail = "they were recorded without content fingerprints (by an older version), so what they " \
                         "were computed from is unknown"
            else:
                flat_old, flat_new = _flat(old), _flat(meta)
                diff = sorted(k for k in set(flat_old) | set(flat_new) if flat_old.get(k) != flat_new.get(k))
                detail = "; ".join(_what_changed(k, flat_old.get(k), flat_new.get(k)) for k in diff)
            raise ValueError(f"{records_path} holds results of a different setup: {detail}. Nothing is mixed in: "
                             f"evaluate into a fresh output folder (--out / run_eval(out=...)), or delete "
                             f"{records_path} and {path} to redo these items here.")
    elif records_path.exists() and records_path.stat().st_size:
        raise ValueError(f"{records_path} exists without {path.name}: its setup is unknown; delete it to redo it")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def _record(item: MCItem, answer, seconds: float) -> dict:
    if answer.item_id != item.id:
        raise RuntimeError(f"answer for {answer.item_id!r} returned in place of {item.id!r}")
    if answer.letter is not None and answer.letter not in item.letters:
        raise RuntimeError(f"item {item.id!r}: answer {answer.letter!r} is not one of {item.letters}")
    return {"id": item.id, "subject": item.subject, "gold": item.answer, "pred": answer.letter,
            "correct": answer.letter == item.answer, "parse_failure": answer.letter is None,
            "text": answer.text, "scores": answer.scores, "extra": answer.extra, "seconds": seconds}


def _error_record(item: MCItem, error: Exception, seconds: float) -> dict:
    """The record of an item whose method raised: counted wrong, the error kept."""
    return {"id": item.id, "subject": item.subject, "gold": item.answer, "pred": None, "correct": False,
            "parse_failure": False, "text": None, "scores": None, "extra": {}, "seconds": seconds,
            "error": f"{type(error).__name__}: {error}"}


def _answer_records(method: Method, batch: list[MCItem], where: str) -> list[dict]:
    """One record per item of a batch. A batch that raises is answered again item by item, so only the
    items that raise themselves get an error record (each logged with its traceback)."""
    t0 = time.perf_counter()
    try:
        answers = method.answer(batch, batch_size=len(batch))
    except Exception as error:  # noqa: BLE001 - recorded per item, reported in the table, systematic ones stop
        if len(batch) > 1:
            log.warning("%s: a batch of %d items raised %s: %s; answering them one by one", where, len(batch),
                        type(error).__name__, error)
            return [record for item in batch for record in _answer_records(method, [item], where)]
        log.warning("%s: item %r raised (counted wrong)", where, batch[0].id, exc_info=error)
        return [_error_record(batch[0], error, time.perf_counter() - t0)]
    if len(answers) != len(batch):
        raise EvaluationError(f"{where}: {len(answers)} answers for {len(batch)} items {[i.id for i in batch]}")
    per_item = (time.perf_counter() - t0) / len(batch)
    return [_record(item, answer, per_item) for item, answer in zip(batch, answers)]


def _stop_if_systematic(records: list[dict], pending: int, where: str, records_path: Path) -> None:
    """EvaluationError when the items run so far (in order) fail systematically (module docstring)."""
    failed = [r for r in records if r.get("error")]
    if not failed:
        return
    first = min(FIRST_ITEMS_ALL_FAILED, pending)
    if len(records) >= first and all(r.get("error") for r in records[:first]):
        why = f"the first {first} items all raised"
    elif len(records) >= ERROR_FRACTION_MIN_ITEMS and len(failed) > MAX_ERROR_FRACTION * len(records):
        why = f"{len(failed)} of {len(records)} items raised (more than {MAX_ERROR_FRACTION:.0%})"
    else:
        return
    ids = [r["id"] for r in failed]
    shown = "; ".join(f"{r['id']!r}: {r['error']}" for r in failed[:EXAMPLES_SHOWN])
    raise EvaluationError(f"{where}: stopped, {why}: items {ids[:20]}{' ...' if len(ids) > 20 else ''}. "
                          f"First errors: {shown}. Their records in {records_path} hold the errors; a rerun "
                          "retries them.")


def _drop_error_records(path: Path, records: list[dict]) -> list[dict]:
    """The records without errors; the file is rewritten without the others (atomically) so they are redone."""
    kept = [r for r in records if not r.get("error")]
    if len(kept) < len(records):
        log.info("%s: retrying %d items whose earlier run raised", path, len(records) - len(kept))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return kept


def evaluate(method: Method, items: Sequence[MCItem], folder: str | os.PathLike, *,
             benchmark: str | None = None, key: str | None = None, batch_size: int = 8,
             progress: bool = True, source: dict | None = None, dropped: dict | None = None) -> BenchmarkResult:
    """Run ``method`` on ``items``, caching one record per item in ``folder/<benchmark>.jsonl``.

    Items already there are skipped (resume). Pending items run longest prompt first (less padding
    per batch); the records come back in item order. An item whose method raises is counted wrong and
    its record holds the error (a batch that raises is redone item by item); items recorded with an
    error are retried on resume. Systematic failures stop the run with an ``EvaluationError`` naming
    the items (``FIRST_ITEMS_ALL_FAILED``, ``MAX_ERROR_FRACTION``); what was done before is kept.
    source: where the items came from (default ``{"name": benchmark}``); together with the method's
    ``describe()`` it is saved next to the records and must match on resume (the item count may change:
    a larger ``limit`` resumes and extends a smaller one). Records are reused only under the same
    content fingerprints (``c2c.fingerprint``): the method's models, tokenizers and fusers, the data
    (``items.fingerprint`` of a ``BenchmarkItems``) and the code in ``EVAL_CODE``; else the run refuses,
    saying what changed. ``folder`` is locked while this runs (``c2c.locks``).
    """
    with folder_lock(folder, "evaluation"):
        return _evaluate_locked(method, items, Path(folder), benchmark=benchmark, key=key, batch_size=batch_size,
                                progress=progress, source=source, dropped=dropped)


def _evaluate_locked(method: Method, items_given: Sequence[MCItem], folder: Path, *, benchmark, key, batch_size,
                     progress, source, dropped) -> BenchmarkResult:
    items = list(items_given)
    if not items:
        raise ValueError("evaluate() got no items")
    benchmark = benchmark or items[0].benchmark
    key = key or method.name
    records_path = folder / f"{benchmark}.jsonl"
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{benchmark}: duplicate item ids in the items to evaluate")
    fingerprints = {"code": code_version(*EVAL_CODE), "data": getattr(items_given, "fingerprint", None),
                    **method.fingerprints()}
    _check_meta(folder / f"{benchmark}.meta.json", {"method": method.describe(), "benchmark": source or
                                                    {"name": benchmark}, "fingerprints": fingerprints}, records_path)

    done = {r["id"]: r for r in _drop_error_records(records_path, read_records(records_path))}
    by_id = {i.id: i for i in items}
    for r in done.values():
        if r["id"] in by_id and r["gold"] != by_id[r["id"]].answer:
            raise ValueError(f"{records_path}: item {r['id']!r} was scored against gold {r['gold']!r}, "
                             f"but the benchmark now says {by_id[r['id']].answer!r}; delete the file to redo it")
    pending = [i for i in items if i.id not in done]
    pending.sort(key=lambda i: -len(mc_prompt(i)))  # stable: ties keep item order
    where = f"{method.label} on {benchmark}"

    bar = tqdm(total=len(items), initial=len(items) - len(pending), desc=f"{key}/{benchmark}",
               unit="item", disable=not progress, dynamic_ncols=True)
    ran: list[dict] = []  # this call's records, in the order run
    try:
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            records = _answer_records(method, batch, where)
            append_jsonl(records_path, records)
            done.update((r["id"], r) for r in records)
            bar.update(len(batch))
            ran += records
            _stop_if_systematic(ran, len(pending), where, records_path)
    finally:
        bar.close()
    return BenchmarkResult(key, method.label, benchmark, [done[i] for i in ids], dict(dropped or {}))


# --------------------------------------------------------------------------- building methods


class _Models:
    """The models of a run, loaded on first use and shared by every method (one object per source: a
    method whose sharer is the receiver reads the receiver's own model), each with its prompt-cache store
    attached when the config asks for one."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.dtype = getattr(torch, cfg["dtype"]) if isinstance(cfg["dtype"], str) else cfg["dtype"]
        device = cfg["device"]
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self._loaded: dict[str, tuple] = {}

    def get(self, source: str):
        if source not in self._loaded:
            print(f"loading {source}", flush=True)
            local = repo_path(source)  # a folder of this project's (runs/...) is repository-relative
            model, tokenizer = load_model(local if local.exists() else source, dtype=self.dtype, device=self.device)
            if self.cfg["prefix_cache"]:
                store = PrefixStore(model).attach()
                print(f"prompt caches of {source}: {store.folder} ({len(store)} stored)", flush=True)
            self._loaded[source] = (model, tokenizer)
        return self._loaded[source]


def _check_fuser_checkpoint(cfg: dict) -> None:
    """Each C2C method's fuser checkpoint: there, and (ours) with a readable config, checked before any model loads."""
    for entry in cfg["methods"]:
        if entry["name"] != "c2c":
            continue
        for spec in [entry["fuser"]] + [more["fuser"] for more in entry["more_sharers"]]:
            if "checkpoint" not in spec:
                continue
            folder = repo_path(spec["checkpoint"])
            if (folder / CONFIG_NAME).is_file():
                FuserConfig.from_json_file(folder / CONFIG_NAME)
            elif not (folder / PUBLISHED_CONFIG_NAME).is_file():
                raise FileNotFoundError(f"method {entry['key']}: fuser checkpoint {str(folder)!r} holds neither "
                                        f"{CONFIG_NAME} (ours) nor {PUBLISHED_CONFIG_NAME} (a published one); train "
                                        "one (c2c.train) or fix fuser.checkpoint")


def warn_if_trained_for_other_models(fuser, sources: dict) -> None:
    """Warn (not refuse) when a fuser's recorded model names differ from the config's.

    The shapes, layer counts and vocabulary sizes are checked strictly when it loads (``check_fits``),
    so a fuser that gets here fits the pair; names are only a hint, since one model has many names
    (``offline:x``, its converted folder, a copied folder, a hub id and its cache snapshot).
    """
    for role in ("receiver", "sharer"):
        recorded = getattr(fuser.config, role, None)
        if recorded and str(recorded) != str(sources[role]):
            log.warning("the fuser was trained with %s %r, this run's %s is %r: the shapes fit, so it is used; "
                        "if these are not the same model, use a fuser trained for this pair", role, recorded,
                        role, sources[role])


def _fuser(spec: dict, sources: dict, receiver, sharer):
    """A C2C method's fuser from its spec; sources: the receiver's and sharer's model sources (names)."""
    if "checkpoint" in spec:
        folder = repo_path(spec["checkpoint"])
        fuser = load_fuser(folder, receiver.config, sharer.config, dtype=receiver.dtype)
        warn_if_trained_for_other_models(fuser, sources)
        return fuser, f"checkpoint:{repo_relative(folder)}"
    fuser = random_fuser(receiver.config, sharer.config, **(spec["random"] or {}))
    name = "random(" + ", ".join(f"{k}={v}" for k, v in sorted(spec["random"].items())) + ")"
    return fuser, name


def build_method(entry: dict, cfg: dict, models: _Models) -> Method:
    """A method object from a (checked) method entry of a config."""
    options = {"scoring": entry["scoring"], "max_new_tokens": entry["max_new_tokens"],
               "assistant_prefix": entry["assistant_prefix"], "label": entry.get("label"),
               "static_cache": STATIC_CACHE[cfg["static_cache"]]}
    name = entry["name"]
    if name == "receiver":
        return ReceiverAlone(*models.get(entry["model"]), model_name=entry["model"], **options)
    if name == "sharer":
        return SharerAlone(*models.get(entry["model"]), model_name=entry["model"], **options)
    if name == "t2t":
        return TextToText(*models.get(cfg["receiver"]), *models.get(cfg["sharer"]),
                          sharer_max_new_tokens=entry["sharer_max_new_tokens"], protocol=entry["t2t_protocol"],
                          receiver_name=cfg["receiver"],
                          sharer_name=cfg["sharer"], **options)
    if name == "c2c":
        receiver, r_tok = models.get(cfg["receiver"])
        if not entry["more_sharers"]:
            sources = {"receiver": cfg["receiver"], "sharer": entry["sharer"]}
            fuser, fuser_name = _fuser(entry["fuser"], sources, receiver, models.get(entry["sharer"])[0])
            return C2C.from_models(receiver, r_tok, *models.get(entry["sharer"]), fuser, alignment=cfg["alignment"],
                                   fuser_name=fuser_name, receiver_name=cfg["receiver"],
                                   sharer_names=[entry["sharer"]], **options)
        sharers = [{"sharer": entry["sharer"], "fuser": entry["fuser"]}] + entry["more_sharers"]
        loaded = [models.get(s["sharer"]) for s in sharers]
        fusers = [_fuser(s["fuser"], {"receiver": cfg["receiver"], "sharer": s["sharer"]}, receiver, model)
                  for s, (model, _) in zip(sharers, loaded)]
        # one strategy for every sharer whose tokenizer differs: the config's, else the one their fusers trained with
        alignment = cfg["alignment"] or next((f.config.alignment for f, _ in fusers if f.config.alignment),
                                             DEFAULT_ALIGNMENT)
        model = C2CModel(receiver, r_tok, [m for m, _ in loaded], [t for _, t in loaded],
                         [f.to(device=receiver.device, dtype=receiver.dtype).eval() for f, _ in fusers],
                         alignment=alignment, multi_sharer=entry["multi_sharer"])
        return C2C(model, fuser_name=" + ".join(fuser_name for _, fuser_name in fusers), receiver_name=cfg["receiver"],
                   sharer_names=[s["sharer"] for s in sharers], **options)
    raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")


# --------------------------------------------------------------------------- running a config


def _provenance() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        # "-dirty" when tracked code or configs differ from the commit; results and figures being (re)written
        # by this very run, and untracked files, do not count
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results",
                                ":!figures"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        info["git_commit"] = commit + ("-dirty" if dirty else "") if commit else None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def _write_config(cfg: dict, out: Path, command: str) -> None:
    header = ["# The exact config that produced main_table.csv / main_table.md in this folder.",
              f"# command: {command}"]
    header += [f"# {k}: {v}" for k, v in _provenance().items()]
    (out / EVAL_CONFIG).write_text("\n".join(header) + "\n" + yaml.safe_dump(cfg, sort_keys=False,
                                                                               allow_unicode=True))


def run_eval(config: str | os.PathLike | dict, out: str | os.PathLike | None = None, *, progress: bool = True,
             command: str | None = None, methods: Sequence[str] | None = None,
             benchmarks: Sequence[str] | None = None, **overrides) -> EvalReport:
    """Evaluate every method of a config on every benchmark; write the main table; return the report.

    out: the run folder (default: the config's ``output``, else ``results/<name>``). overrides:
    top-level config keys (``limit=50``, ``batch_size=4``, ...) applied before the config is checked
    and saved. methods / benchmarks: run only these method keys (a name that is no key: every method of that
    name) / benchmark names.
    Benchmarks are all loaded (and their files checked) before any model is loaded.
    """
    cfg, out = _selected(config, out, overrides, methods, benchmarks)
    command = command or "run_eval(" + repr(str(config) if not isinstance(config, dict) else "<dict>") + ")"
    with folder_lock(out, "evaluation"):  # one run per folder (FolderInUseError names the other's pid)
        return _run_locked(cfg, out, command, progress)


def _selected(config, out, overrides: dict, methods: Sequence[str] | None,
              benchmarks: Sequence[str] | None) -> tuple[dict, Path]:
    """The checked config with the overrides applied, only the methods / benchmarks asked for, and its run folder
    (made)."""
    raw = read_raw_config(config)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    cfg = load_eval_config(raw)
    if methods:
        wanted = set(methods)
        unknown = wanted - {m["key"] for m in cfg["methods"]} - {m["name"] for m in cfg["methods"]}
        if unknown:
            raise ValueError(f"methods {sorted(unknown)} are not in the config; it has "
                             f"{[m['key'] for m in cfg['methods']]}")
        keys = {m["key"] for m in cfg["methods"]}  # a key selects that method; a name that is no key, all of that name
        cfg["methods"] = [m for m in cfg["methods"] if m["key"] in wanted or (m["name"] in wanted - keys)]
    if benchmarks:
        unknown = set(benchmarks) - {b["name"] for b in cfg["benchmarks"]}
        if unknown:
            raise ValueError(f"benchmarks {sorted(unknown)} are not in the config; it has "
                             f"{[b['name'] for b in cfg['benchmarks']]}")
        cfg["benchmarks"] = [b for b in cfg["benchmarks"] if b["name"] in set(benchmarks)]
    out = repo_path(out or cfg["output"] or Path("results") / cfg["name"])
    cfg["output"] = repo_relative(out)
    out.mkdir(parents=True, exist_ok=True)
    return cfg, out


def _run_locked(cfg: dict, out: Path, command: str, progress: bool) -> EvalReport:
    """``run_eval`` once its config is checked and its run folder locked."""
    # 1. every benchmark and the fuser's config, before any model (missing files and bad records fail fast)
    _check_fuser_checkpoint(cfg)
    loaded = _load_benchmarks(cfg, out)
    _write_config(cfg, out, command)

    # 2. every method on every benchmark
    models = _Models(cfg)
    results: dict[tuple[str, str], BenchmarkResult] = {}
    for entry in cfg["methods"]:
        method = build_method(entry, cfg, models)
        entry["label"] = method.label
        for b in cfg["benchmarks"]:
            items = loaded[b["name"]]
            result = evaluate(method, items, out / "eval" / entry["key"], benchmark=b["name"], key=entry["key"],
                              batch_size=entry["batch_size"], progress=progress, source=_benchmark_info(b),
                              dropped=getattr(items, "dropped", {}))
            results[(entry["key"], b["name"])] = result
            print(f"{entry['key']} / {b['name']}: accuracy {100 * result.accuracy:.2f}% "
                  f"({result.correct}/{result.n}), parse failures {result.parse_failures}, "
                  f"errors {result.errors}, {result.items_per_s:.2f} items/s", flush=True)
            for e in result.parse_failure_examples:
                print(f"    unparsed {e['id']}: {e['text'][:100]!r}", flush=True)
            for e in result.error_examples:
                print(f"    raised {e['id']}: {e['error'][:200]}", flush=True)
    return _write_report(cfg, out, results, command)


def _load_benchmarks(cfg: dict, out: Path) -> dict:
    """benchmark name -> its items (``BenchmarkItems``), every benchmark of the config loaded and checked."""
    loaded = {}
    for b in cfg["benchmarks"]:
        if b["name"] == HELD_OUT_BENCHMARK:
            items = load_mc_mix_held_out(b["limit"], b["source"])
            _check_never_trained_on(cfg, items, b["source"])
        else:
            items = load_benchmark(b["name"], resolve_source(b["source"], b["name"], out), split=b["split"],
                                   limit=b["limit"], subjects=b["subjects"])
        loaded[b["name"]] = items
        print(f"{b['name']}: {len(items)} items from {items.source or 'the hub'}", flush=True)
    return loaded


def _check_never_trained_on(cfg: dict, items, mix_root) -> None:
    """Refuse held-out MC-mix items that a C2C method's fuser was trained on: its run's ``config.yaml`` (beside the
    checkpoint, as ``c2c.train`` writes it) names ``offline:mc-mix`` with a ``max_examples`` reaching into them.
    A fuser without a run config beside it (a published one) was not trained here and is not checked."""
    for entry in cfg["methods"]:
        specs = [entry["fuser"]] + [more["fuser"] for more in entry["more_sharers"]] if entry["name"] == "c2c" else []
        for spec in specs:
            run_config = repo_path(spec["checkpoint"]).parent / "config.yaml" if "checkpoint" in spec else None
            if run_config is None or not run_config.is_file():
                continue
            trained = load_train_config(run_config)
            if trained.dataset != "offline:mc-mix":
                continue
            seen = trained_items_among(items, trained.max_examples, mix_root)
            if seen:
                raise ValueError(f"method {entry['key']}: its fuser ({spec['checkpoint']}) was trained on "
                                 f"{len(seen)} of the {len(items)} held-out MC-mix items (max_examples "
                                 f"{trained.max_examples} in {repo_relative(run_config)}), e.g. {seen[0]}: "
                                 f"lower {HELD_OUT_BENCHMARK}'s limit, or evaluate a fuser trained on fewer examples")


def _benchmark_info(entry: dict) -> dict:
    """A benchmark entry as its records' meta holds it (where the items came from)."""
    return {"name": entry["name"], "source": entry["source"], "split": entry["split"], "subjects": entry["subjects"]}


def _write_report(cfg: dict, out: Path, results: dict, command: str) -> EvalReport:
    """The main table of these results (plus the derived routing row where the config asks), written to ``out``."""
    report = EvalReport(cfg, out, list(cfg["methods"]), [b["name"] for b in cfg["benchmarks"]], results, command)
    if cfg["routing"]:
        report.add_routing()
    report.write()
    print(f"wrote {repo_relative(out / 'main_table.md')} and {repo_relative(out / 'main_table.csv')}", flush=True)
    return report


def table_from_records(config: str | os.PathLike | dict, out: str | os.PathLike | None = None, *,
                       command: str | None = None, methods: Sequence[str] | None = None,
                       benchmarks: Sequence[str] | None = None, **overrides) -> EvalReport:
    """The main table rebuilt from the records on disk, loading no model (arguments as ``run_eval``'s).

    A method with no records on a benchmark is a "-" in the table; records that do not cover every item of the
    benchmark stop it (finish the evaluation first). Records written under other prompt/scoring code
    (``EVAL_CODE``) or other benchmark records, or by another method or scoring, are refused as ``run_eval``
    refuses them; the models' and fusers' fingerprints are not checked (no model is loaded): the records' meta
    files name them.
    """
    cfg, out = _selected(config, out, overrides, methods, benchmarks)
    command = command or "table_from_records(" + repr(str(config) if not isinstance(config, dict) else "<dict>") + ")"
    with folder_lock(out, "evaluation"):
        loaded = _load_benchmarks(cfg, out)
        code = code_version(*EVAL_CODE)
        results = {}
        for entry in cfg["methods"]:
            for b in cfg["benchmarks"]:
                result = _recorded_result(entry, b, loaded[b["name"]], out, code)
                if result is not None:
                    results[(entry["key"], b["name"])] = result
            entry["label"] = entry.get("label") or entry["key"]  # a method with no records yet
        _write_config(cfg, out, command)
        return _write_report(cfg, out, results, command)


def _recorded_result(entry: dict, benchmark: dict, items, out: Path, code: str) -> BenchmarkResult | None:
    """One method's records on one benchmark as a result, checked against the config (``table_from_records``)."""
    path = out / "eval" / entry["key"] / f"{benchmark['name']}.jsonl"
    meta_path = path.with_name(f"{benchmark['name']}.meta.json")
    if not path.exists():
        return None
    if not meta_path.is_file():
        raise ValueError(f"{path} exists without {meta_path.name}: its setup is unknown; delete it and re-evaluate")
    meta = json.loads(meta_path.read_text())
    recorded = {"method": meta["method"]["method"], "scoring": meta["method"]["scoring"],
                "benchmark": meta["benchmark"], "code": meta["fingerprints"]["code"],
                "data": meta["fingerprints"]["data"]}
    wanted = {"method": entry["name"], "scoring": entry["scoring"], "benchmark": _benchmark_info(benchmark),
              "code": code, "data": getattr(items, "fingerprint", None)}
    changed = [f"{k}: recorded {recorded[k]!r}, now {wanted[k]!r}" for k in wanted if recorded[k] != wanted[k]]
    if changed:
        raise ValueError(f"{path} holds results of a different setup ({'; '.join(changed)}): re-evaluate it "
                         "(python -m c2c.evaluate --config ...) or point the table at the right run folder")
    by_id = {r["id"]: r for r in read_records(path)}
    missing = [i.id for i in items if i.id not in by_id]
    if missing:
        raise ValueError(f"{path}: {len(missing)} of {len(items)} items have no record yet (e.g. {missing[:3]}); "
                         "finish the evaluation (python -m c2c.evaluate --config ...) before building the table")
    model = Path(meta["method"].get("model") or "").name
    default = {"receiver": f"Receiver alone ({model})", "sharer": f"Sharer alone ({model})", "t2t": "T2T",
               "c2c": "C2C"}[entry["name"]]  # as c2c.methods' default_label (a test compares them)
    entry["label"] = entry.get("label") or default
    return BenchmarkResult(entry["key"], entry["label"], benchmark["name"], [by_id[i.id] for i in items],
                           dict(getattr(items, "dropped", {})))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m c2c.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (configs/eval_*.yaml)")
    parser.add_argument("--out", help="run folder (default: the config's output, else results/<name>)")
    parser.add_argument("--limit", type=int, help="at most this many items per benchmark")
    parser.add_argument("--batch-size", type=int, help="items per batch (every method)")
    parser.add_argument("--scoring", choices=SCORING_MODES, help="scoring mode of every method without its own")
    parser.add_argument("--methods", help="comma-separated method keys or names to run (default: all)")
    parser.add_argument("--benchmarks", help="comma-separated benchmark names to run (default: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--table-only", action="store_true",
                        help="rebuild the main table from the records on disk, loading no model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = "python -m c2c.evaluate " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        selection = {"command": command, "limit": args.limit, "batch_size": args.batch_size, "scoring": args.scoring,
                     "methods": args.methods.split(",") if args.methods else None,
                     "benchmarks": args.benchmarks.split(",") if args.benchmarks else None}
        if args.table_only:
            table_from_records(args.config, args.out, **selection)
        else:
            run_eval(args.config, args.out, progress=not args.no_progress, **selection)
    except (EvaluationError, ValueError, FileNotFoundError, FolderInUseError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
