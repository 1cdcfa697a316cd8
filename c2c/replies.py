"""Free-text replies to single-turn prompts, kept per item: what the generative experiments share (the GSM8K
workflow of Table 15, LongBench of Tables 5 and 11).

* ``generate_replies``: one model's greedy replies (chat template, thinking off), with the context checked;
* ``generate_fused``: the receiver's greedy replies from its cache of each prompt fused with the sharers' caches of
  the same prompt (``c2c.fused.C2CModel``);
* ``pair_from_fuser``: the receiver, sharer and C2C model of the pair a trained fuser was made for;
* ``evaluate_methods``: several methods' records on the same items, with a text another model writes first for some
  of them (``HelperText``: the interpreter's analysis, T2T's message), under a lock of the output folder;
* ``run_items``: a method's per-item records in ``<out>/<name>.jsonl``, computed in batches for the items not there
  yet, beside ``<out>/<name>.meta.json``, what produced them: a rerun reuses them and does only the missing items;
  under another meta it refuses and names what changed. Each record gets its ``seconds`` (per item of its batch).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from c2c.align import DEFAULT_ALIGNMENT
from c2c.checkpoint import load_fuser
from c2c.eval_config import STATIC_CACHE, load_eval_config
from c2c.evaluate import _Models
from c2c.fused import C2CModel, check_context, generate_from_prefix, left_pad, pad_token_id
from c2c.fuser import CONFIG_NAME, FuserConfig
from c2c.jsonl import append_jsonl, read_jsonl
from c2c.locks import folder_lock
from c2c.methods import _check_decoding, _decode_new, _eos_ids, _greedy_kwargs, render_ids
from c2c.paths import repo_path


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, *,
                     static_cache: bool | None = None, who: str = "the model") -> tuple[list[str], list[int]]:
    """Greedy replies of one model to single-turn chats (thinking off) and their lengths in tokens; a prompt that
    leaves no room for ``max_new_tokens`` in the model's context raises (naming ``who``)."""
    rows = [render_ids(tokenizer, chat(p)) for p in prompts]
    check_context(model.config, max(map(len, rows)), max_new_tokens, who)
    ids, mask = left_pad(rows, pad_token_id(tokenizer), device=model.device)  # (B, T)
    greedy = _greedy_kwargs(model, tokenizer, max_new_tokens)
    sequences = generate_from_prefix(model, ids, mask, static_cache=static_cache, **greedy)  # (B, T + new)
    _check_decoding(greedy)
    return _decode_new(tokenizer, sequences[:, ids.shape[1]:], _eos_ids(model, tokenizer))


@torch.no_grad()
def generate_fused(c2c: C2CModel, prompts: Sequence[str], max_new_tokens: int, *,
                   static_cache: bool | None = None) -> tuple[list[str], list[int]]:
    """Greedy replies of the receiver from its cache of each chat fused with the sharers' caches of the same chat."""
    inputs = c2c.prepare([chat(p) for p in prompts]).to(c2c.receiver.device)
    greedy = _greedy_kwargs(c2c.receiver, c2c.receiver_tokenizer, max_new_tokens)
    sequences = c2c.generate(inputs, static_cache=static_cache, **greedy)  # (B, T + new)
    _check_decoding(greedy)
    return _decode_new(c2c.receiver_tokenizer, sequences[:, inputs.input_ids.shape[1]:],
                       _eos_ids(c2c.receiver, c2c.receiver_tokenizer))


def pair_from_fuser(fuser_folder: str | os.PathLike, settings: str | os.PathLike | dict) -> dict:
    """The pair a trained fuser was made for (its ``fuser_config.json`` names the receiver and the sharer), loaded
    as ``c2c.evaluate`` loads an evaluation's models, with the ``dtype``, ``device``, ``prefix_cache`` and
    ``static_cache`` of an evaluation config (``settings``): receiver, receiver_tokenizer, sharer,
    sharer_tokenizer, c2c (the C2C model with that fuser) and static_cache."""
    folder = repo_path(fuser_folder)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} holds no trained fuser ({CONFIG_NAME}): train it first (notebook 03, "
                                "`make 03_train_fuser PROFILE=<profile>`, or python -m c2c.train)")
    config = FuserConfig.from_json_file(folder / CONFIG_NAME)
    if not (config.receiver and config.sharer):
        raise ValueError(f"{folder} does not name the receiver and sharer it was trained for; retrain it")
    cfg = load_eval_config(settings if isinstance(settings, dict) else repo_path(settings))
    models = _Models(cfg)  # as an evaluation loads them (prompt caches on disk where the config keeps them)
    (receiver, receiver_tokenizer), (sharer, sharer_tokenizer) = models.get(config.receiver), models.get(config.sharer)
    fuser = load_fuser(folder, receiver.config, sharer.config, dtype=receiver.dtype, device=receiver.device)
    c2c = C2CModel(receiver, receiver_tokenizer, [sharer], [sharer_tokenizer], [fuser],
                   alignment=config.alignment or DEFAULT_ALIGNMENT)
    return {"receiver": receiver, "receiver_tokenizer": receiver_tokenizer, "sharer": sharer,
            "sharer_tokenizer": sharer_tokenizer, "c2c": c2c, "static_cache": STATIC_CACHE[cfg["static_cache"]]}


def check_meta(out: Path, name: str, meta: dict) -> None:
    """Write ``name``'s meta on first use; refuse records made under another one."""
    path = out / f"{name}.meta.json"
    if not path.exists():
        path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    changed = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
    if changed:
        raise ValueError(f"{out / (name + '.jsonl')} was made with other {', '.join(changed)}; "
                         f"delete {out / (name + '.jsonl')} and {path} to redo it, or write to another folder")


def run_items(out: Path, name: str, meta: dict, items: Sequence, batch_size: int,
              answer: Callable[[list], list[dict]], progress: bool) -> dict:
    """Records of ``name`` by id (``item.id``), computing the missing items' in batches (``answer(batch) ->
    records``, one per item, each with its ``id``)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    check_meta(out, name, meta)
    path = out / f"{name}.jsonl"
    done = {r["id"]: r for r in read_jsonl(path, repair=True)}
    pending = [item for item in items if item.id not in done]
    bar = tqdm(total=len(items), initial=len(items) - len(pending), desc=name, disable=not progress)
    for start in range(0, len(pending), batch_size):
        batch = pending[start:start + batch_size]
        began = time.perf_counter()
        records = answer(batch)
        if [r["id"] for r in records] != [item.id for item in batch]:
            raise RuntimeError(f"{name}: the answers' ids do not match the batch's items")
        seconds = (time.perf_counter() - began) / len(batch)
        for record in records:
            record["seconds"] = seconds
            done[record["id"]] = record
        append_jsonl(path, records)
        bar.update(len(batch))
    bar.close()
    return done


@dataclass(frozen=True)
class HelperText:
    """A text another model writes for each item before the methods in ``needed_by`` answer (they read it):
    ``write(batch) -> (texts, token counts)``, kept as the records ``name`` with the text in ``field``."""

    name: str
    field: str
    needed_by: frozenset
    write: Callable[[list], tuple[list[str], list[int]]]


def evaluate_methods(out: str | os.PathLike, what: str, items: Sequence, methods: Sequence[str], *,
                     describe: Callable[[str], dict], answer: Callable[[str, list, list | None], list[dict]],
                     helper: HelperText | None = None, batch_size: int = 1,
                     progress: bool = True) -> dict[str, list[dict]]:
    """Each method's per-item records in item order (``run_items``; ``describe(name)``: the meta of a method's or
    the helper's records; ``answer(method, batch, texts)``: a batch's records, ``texts`` the helper's for the
    methods that read it, else None), under a lock of ``out`` naming ``what``. The records of a method that reads
    the helper's text also hold it (``<field>``) and its seconds per item (``<field>_seconds``)."""
    items = list(items)
    if len({i.id for i in items}) != len(items):
        raise ValueError(f"two items of the {what} share an id")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, what):
        texts = {}
        if helper is not None and helper.needed_by & set(methods):
            def write(batch):
                written, counts = helper.write(batch)
                return [{"id": i.id, helper.field: t, f"{helper.field}_tokens": n}
                        for i, t, n in zip(batch, written, counts)]

            texts = run_items(out, helper.name, describe(helper.name), items, batch_size, write, progress)
        records = {}
        for method in methods:
            reads = helper is not None and method in helper.needed_by

            def run(batch, method=method, reads=reads):
                return answer(method, batch, [texts[i.id][helper.field] for i in batch] if reads else None)

            done = run_items(out, method, describe(method), items, batch_size, run, progress)
            records[method] = [{**done[i.id], **({helper.field: texts[i.id][helper.field],
                                                  f"{helper.field}_seconds": texts[i.id]["seconds"]} if reads else {})}
                               for i in items]
    return records
