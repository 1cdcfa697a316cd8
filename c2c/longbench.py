"""Tables 5 and 11: C2C on LongBench-E by input length (the paper's long-context regime, section 1.3).

LongBench-E is 13 English sub-datasets of LongBench with items spread evenly over input lengths. The paper splits
it at random by data index, trains a fuser on 3/4 (prompts up to 12,000 tokens, one epoch) and scores receiver,
sharer, T2T and C2C on the other 1/4 with LongBench's metrics, per input-length bucket (0-4k, 4-8k, 8k+ words,
LongBench-E's ``length``). Here:

* ``load_longbench``: the items, from the hub (``THUDM/LongBench``, ``<name>_e``), a local copy (the folder of its
  ``data.zip``: ``<name>_e.jsonl``, or one data file with LongBench's fields) or invented ones (``tiny_longbench``);
* ``split_items``: within each sub-dataset a random permutation (seed 42) puts ``eval_fraction`` of the items in
  the held-out part (the paper does not say whether its split is per sub-dataset; this keeps the mix the same);
* ``PromptFormat``: each sub-dataset's prompt. LongBench's official prompts are not copied here: give their file
  (LongBench's ``config/dataset2prompt.json``: dataset -> template with ``{context}`` and ``{input}``) to use them;
  without it, this project's own templates (``PROMPTS``). A prompt over ``max_prompt_tokens`` (the receiver's
  tokens) keeps its first and last halves, as LongBench truncates;
* ``training_conversations``: the training part as chats (prompt, first reference answer) for ``c2c.train``;
* ``score``: LongBench's metrics, written from their definitions: token F1 (QA), ROUGE-L F1 (summaries),
  classification, count and retrieval scores, and edit similarity of the first code line, each the maximum over
  the reference answers, in [0, 1];
* ``LongBenchRun`` / ``evaluate_longbench``: greedy replies of receiver, sharer, T2T (the sharer writes what is most
  essential to answering, the receiver reads it after the prompt) and C2C (the receiver's cache of the prompt fused
  with the sharer's), kept per item (``c2c.replies.run_items``);
* ``longbench_rows``: one row per bucket and the average over all items (weighted by items: the paper's Average
  is not the mean of its buckets), each method's mean score x 100, PGRs, and C2C's paired differences from the
  receiver and from T2T (Wald interval, exact sign test).
"""

from __future__ import annotations

import difflib
import json
import os
import random
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer

from c2c.benchmark_files import read_file
from c2c.fingerprint import code_version, fuser_fingerprint, model_fingerprint, tokenizer_fingerprint
from c2c.fused import C2CModel
from c2c.models import resolve_model_source
from c2c.replies import HelperText, evaluate_methods, generate_fused, generate_replies
from c2c.stats import mean_interval, paired_by_id, pgr

HUB_DATASET = "THUDM/LongBench"  # datasets.load_dataset(HUB_DATASET, f"{name}_e", split="test")
# sub-dataset -> metric; LongBench-E's 13 sub-datasets
METRICS = {
    "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "hotpotqa": "qa_f1", "2wikimqa": "qa_f1",
    "gov_report": "rouge_l", "multi_news": "rouge_l",
    "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge_l",
    "passage_count": "count", "passage_retrieval_en": "retrieval",
    "lcc": "code_similarity", "repobench-p": "code_similarity",
}
LONGBENCH_E = tuple(METRICS)
FIRST_LINE = {"trec", "triviaqa", "samsum"}  # few-shot formats: a reply's first line is its answer
BUCKET_EDGES = (4000, 8000)  # words (LongBench-E's `length`): 0-4k, 4-8k, 8k+
METHODS = ("receiver", "sharer", "t2t", "c2c")
LABELS = {"receiver": "Receiver", "sharer": "Sharer", "t2t": "T2T", "c2c": "C2C"}
T2T_MESSAGES = "t2t_messages"  # the sharer's messages' records

# this project's prompts, one per kind of task (LongBench's official ones: give their file to PromptFormat)
_QA = ("Read the text below, then answer the question in as few words as possible.\n\n{context}\n\n"
       "Question: {input}\nAnswer:")
_SUMMARY = "Write a one-paragraph summary of the text below.\n\n{context}\n\nSummary:"
_FEW_SHOT = "Continue the pattern of the examples below; reply with the answer only.\n\n{context}\n\n{input}"
PROMPTS = {
    "qasper": _QA, "multifieldqa_en": _QA, "hotpotqa": _QA, "2wikimqa": _QA,
    "gov_report": _SUMMARY, "multi_news": _SUMMARY,
    "trec": _FEW_SHOT, "triviaqa": _FEW_SHOT, "samsum": _FEW_SHOT,
    "passage_count": ("Below are paragraphs, some of them repeated. How many different paragraphs are there? Reply "
                      "with one number.\n\n{context}\n\nThe number of different paragraphs:"),
    "passage_retrieval_en": ("Below are numbered paragraphs, then a summary of one of them. Which paragraph does the "
                             "summary describe? Reply like \"Paragraph 3\".\n\n{context}\n\nSummary: {input}\n\n"
                             "The summary describes:"),
    "lcc": "Write the next line of the code below.\n\n{context}\nNext line:",
    "repobench-p": "Write the next line of the code below.\n\n{context}{input}\nNext line:",
}
T2T_INSTRUCTION = ("\n\nDo not answer. Instead, in at most a few sentences, write down the information from the "
                   "text above that is most essential for answering.")
T2T_BLOCK = "\n\nAnother assistant's notes on the text:\n{message}"


@dataclass(frozen=True)
class LongItem:
    """One LongBench item: ``length`` is its context's length in words (LongBench-E's, which sets its bucket)."""

    id: str
    dataset: str
    context: str
    input: str
    answers: tuple[str, ...]
    length: int
    all_classes: tuple[str, ...] = ()


# --------------------------------------------------------------------------- data


def _item(record: dict, dataset: str | None, index: int, where: str) -> LongItem:
    name = dataset or record.get("dataset")
    if isinstance(name, str) and name.endswith("_e"):
        name = name[:-2]
    if name not in METRICS:
        raise ValueError(f"{where}: unknown LongBench-E dataset {name!r}; known: {', '.join(LONGBENCH_E)}")
    missing = [k for k in ("context", "input", "answers", "length") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing LongBench field(s) {missing}; found {sorted(record)}")
    answers = record["answers"]
    if isinstance(answers, str):
        answers = [answers]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: 'answers' must be a non-empty list of strings, got {answers!r}")
    return LongItem(f"{name}/{record.get('_id') or index}", name, record["context"] or "", record["input"] or "",
                    tuple(answers), int(record["length"]), tuple(record.get("all_classes") or ()))


def _read_items(path: Path, dataset: str | None) -> list[LongItem]:
    """The items of one data file (``c2c.benchmark_files.read_file``: JSONL, JSON, Parquet, Arrow, CSV)."""
    return [_item(record, dataset, i, f"{path}: record {i}") for i, record in enumerate(read_file(path))]


def tiny_longbench(per_dataset: int = 4, seed: int = 0, words: tuple[int, int] = (20, 160)) -> list[LongItem]:
    """Invented items in LongBench-E's form, every sub-dataset, contexts of ``words`` words (for the tiny profile
    and tests): a fact hidden in filler text, asked for in the form of each sub-dataset's answers."""
    rng = random.Random(seed)
    filler = ("the river ran past the old mill and the wind moved over the hills while people went about "
              "their day").split()
    items = []
    for dataset in LONGBENCH_E:
        for i in range(per_dataset):
            n = rng.randint(*words)
            name, number = rng.choice(["Ada", "Bo", "Cy", "Di"]), rng.randint(1, 9)
            text = [rng.choice(filler) for _ in range(n)]
            text.insert(rng.randrange(n), f"The code of {name} is {number}.")
            answer = {"count": str(number), "retrieval": f"Paragraph {number}", "code_similarity": f"x = {number}",
                      "classification": "number"}.get(METRICS[dataset], f"{name} has code {number}")
            items.append(LongItem(f"{dataset}/tiny-{i}", dataset, " ".join(text), f"What is the code of {name}?",
                                  (answer,), n, ("number", "person") if dataset == "trec" else ()))
    return items


def load_longbench(source: str | os.PathLike | None = "hub", datasets: Sequence[str] | None = None, *,
                   limit_per_dataset: int | None = None) -> list[LongItem]:
    """LongBench-E items of ``datasets`` (default: all 13), in file order, the first ``limit_per_dataset`` of each.

    source: None or "hub" (``datasets.load_dataset("THUDM/LongBench", "<name>_e", split="test")``); "tiny-fixtures"
    (``tiny_longbench``); a folder holding ``<name>_e.jsonl`` files (LongBench's ``data.zip``, unpacked); or one JSONL
    data file (JSONL, JSON, Parquet, Arrow, CSV) whose records name their ``dataset``.
    """
    names = list(datasets or LONGBENCH_E)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown LongBench-E datasets {unknown}; known: {', '.join(LONGBENCH_E)}")
    if limit_per_dataset is not None and (not isinstance(limit_per_dataset, int) or limit_per_dataset < 1):
        raise ValueError(f"limit_per_dataset must be a positive int or None, got {limit_per_dataset!r}")
    by_dataset: dict[str, list[LongItem]] = {}
    if source == "tiny-fixtures":
        for item in tiny_longbench():
            by_dataset.setdefault(item.dataset, []).append(item)
    elif source in (None, "hub"):
        import datasets as hub  # here, not at the top: importing it takes seconds, and only the hub path needs it

        for name in names:
            try:
                rows = hub.load_dataset(HUB_DATASET, f"{name}_e", split="test")
            except Exception as error:
                raise RuntimeError(f"could not load {HUB_DATASET} {name}_e from the hub ({error}); download LongBench's "
                                   "data.zip, unpack it and give its folder as the source") from error
            by_dataset[name] = [_item(dict(r), name, i, f"{HUB_DATASET}:{name}_e[{i}]") for i, r in enumerate(rows)]
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            for name in names:
                file = path / f"{name}_e.jsonl"
                if not file.is_file():
                    raise FileNotFoundError(f"{path} has no {file.name}: give the folder of LongBench's unpacked "
                                            "data.zip (data/<name>_e.jsonl) or choose the datasets it holds")
                by_dataset[name] = _read_items(file, name)
        elif path.is_file():
            for item in _read_items(path, None):
                by_dataset.setdefault(item.dataset, []).append(item)
        else:
            raise FileNotFoundError(f"LongBench source {str(path)!r} does not exist; give a folder of <name>_e.jsonl "
                                    "files, a data file with LongBench's fields, 'hub' or 'tiny-fixtures'")
    missing = [n for n in names if not by_dataset.get(n)]
    if missing:
        raise ValueError(f"{source!r} holds no items of {missing}")
    items = [item for name in names for item in by_dataset[name][:limit_per_dataset]]
    if len({i.id for i in items}) != len(items):
        raise ValueError(f"two items of {source!r} share an id (dataset/_id)")
    return items


def split_items(items: Sequence[LongItem], eval_fraction: float = 0.25,
                seed: int = 42) -> tuple[list[LongItem], list[LongItem]]:
    """(training, held-out): within each sub-dataset, a seeded random permutation of its items puts
    round(eval_fraction x n) of them (at least one) in the held-out part; both parts keep the input order."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    held_out = set()
    for name in dict.fromkeys(i.dataset for i in items):
        ids = [i.id for i in items if i.dataset == name]
        order = random.Random(f"{seed}/{name}").sample(ids, len(ids))
        held_out.update(order[:max(1, round(eval_fraction * len(ids)))])
    return [i for i in items if i.id not in held_out], [i for i in items if i.id in held_out]


def bucket_labels(edges: Sequence[int] = BUCKET_EDGES) -> list[str]:
    """["0-4k", "4-8k", "8k+"] for the paper's edges (words; edges under 1,000 are printed as words)."""
    if not edges or list(edges) != sorted(set(edges)) or edges[0] <= 0:
        raise ValueError(f"bucket edges must be increasing positive word counts, got {edges!r}")

    def words(n: int) -> str:
        return f"{n / 1000:g}k" if n >= 1000 else str(n)

    def span(a: int, b: int) -> str:  # "0-4k", "4-8k" (the paper's), "60-120"
        return f"{a / 1000:g}-{words(b)}" if b >= 1000 and (a == 0 or a >= 1000) else f"{words(a)}-{words(b)}"

    return [span(a, b) for a, b in zip([0, *edges], edges)] + [f"{words(edges[-1])}+"]


def bucket_of(length: int, edges: Sequence[int] = BUCKET_EDGES) -> str:
    """The bucket of a context of ``length`` words: [0, e1), [e1, e2), ..., [e_last, inf)."""
    return bucket_labels(edges)[sum(length >= e for e in edges)]


# --------------------------------------------------------------------------- prompts


@dataclass
class PromptFormat:
    """Each sub-dataset's prompt: ``templates`` (dataset -> text with {context} and {input}; default ``PROMPTS``,
    or LongBench's ``dataset2prompt.json`` given as ``templates_file``), cut to ``max_prompt_tokens`` of
    ``tokenizer`` by keeping the first and the last half."""

    tokenizer: object
    max_prompt_tokens: int
    templates: dict = field(default_factory=lambda: dict(PROMPTS))

    @classmethod
    def from_file(cls, tokenizer, max_prompt_tokens: int, templates_file: str | os.PathLike | None) -> "PromptFormat":
        if templates_file is None:
            return cls(tokenizer, max_prompt_tokens)
        path = Path(templates_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no prompt file {str(path)!r}: give LongBench's config/dataset2prompt.json "
                                    "(dataset -> template) or null for this project's prompts")
        templates = json.loads(path.read_text(encoding="utf-8"))
        missing = [n for n in LONGBENCH_E if n not in templates and f"{n}_e" not in templates]
        if missing:
            raise ValueError(f"{path} has no template for {missing}")
        return cls(tokenizer, max_prompt_tokens, {n: templates.get(n, templates.get(f"{n}_e")) for n in LONGBENCH_E})

    def __post_init__(self):
        if not isinstance(self.max_prompt_tokens, int) or self.max_prompt_tokens < 2:
            raise ValueError(f"max_prompt_tokens must be an int >= 2, got {self.max_prompt_tokens!r}")

    def fit(self, text: str, max_tokens: int | None = None) -> str:
        """``text``, or its first and last halves of ``max_tokens`` (default ``max_prompt_tokens``) tokens."""
        limit = max_tokens or self.max_prompt_tokens
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) <= limit:
            return text
        head = limit // 2
        return (self.tokenizer.decode(ids[:head], skip_special_tokens=True)
                + self.tokenizer.decode(ids[len(ids) - (limit - head):], skip_special_tokens=True))

    def prompt(self, item: LongItem, max_tokens: int | None = None) -> str:
        return self.fit(self.templates[item.dataset].format(context=item.context, input=item.input), max_tokens)

    def describe(self) -> dict:
        return {"templates": self.templates, "max_prompt_tokens": self.max_prompt_tokens,
                "tokenizer": tokenizer_fingerprint(self.tokenizer)}


def load_tokenizer(source: str | os.PathLike):
    """The tokenizer of a model source (a tiny name, folder, GGUF file or hub id), without loading the model."""
    location, gguf = resolve_model_source(source)
    return AutoTokenizer.from_pretrained(location, **({"gguf_file": gguf} if gguf else {}))


def training_conversations(items: Sequence[LongItem], prompts: PromptFormat, max_length: int,
                           margin: int = 64) -> list[list[dict]]:
    """The training items as chats for ``c2c.train``: the prompt (cut so that prompt, first reference answer and
    ``margin`` tokens of chat template fit ``max_length`` receiver tokens) and the first answer as the reply."""
    conversations = []
    for item in items:
        answer = item.answers[0]
        budget = max_length - margin - len(prompts.tokenizer(answer, add_special_tokens=False).input_ids)
        if budget < 2:
            raise ValueError(f"{item.id}: its answer leaves no room for a prompt in max_length {max_length}")
        conversations.append([{"role": "user", "content": prompts.prompt(item, min(budget, prompts.max_prompt_tokens))},
                              {"role": "assistant", "content": answer}])
    return conversations


# --------------------------------------------------------------------------- metrics


def normalise_answer(text: str) -> str:
    """Lower case, without punctuation, the articles a/an/the and extra white space (SQuAD's normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(w for w in text.split() if w not in {"a", "an", "the"})


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised words two texts share (counted with multiplicity)."""
    predicted, gold = normalise_answer(prediction).split(), normalise_answer(reference).split()
    same = sum((Counter(predicted) & Counter(gold)).values())
    if not same:
        return 0.0
    precision, recall = same / len(predicted), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of the two texts' lower-cased, punctuation-free words."""
    predicted = "".join(" " if ch in string.punctuation else ch for ch in prediction.lower()).split()
    gold = "".join(" " if ch in string.punctuation else ch for ch in reference.lower()).split()
    if not predicted or not gold:
        return 0.0
    previous = [0] * (len(gold) + 1)
    for word in predicted:  # one row of the LCS table at a time
        current = [0]
        for j, other in enumerate(gold):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def classification_score(prediction: str, reference: str, classes: Sequence[str]) -> float:
    """1/k when the reference class is among the k classes the reply names (a class inside a longer named class
    is not counted on its own), else 0."""
    named = [c for c in classes if c in prediction]
    named = [c for c in named if not any(c != other and c in other for other in named)]
    return 1.0 / len(named) if reference in named else 0.0


def _share_equal(numbers: list[str], target: str) -> float:
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, reference: str) -> float:
    """The share of the numbers in the reply that equal the reference count."""
    return _share_equal(re.findall(r"\d+", prediction), reference.strip())


def retrieval_score(prediction: str, reference: str) -> float:
    """The share of the numbers in the reply that equal the reference's paragraph number ("Paragraph 12")."""
    target = re.findall(r"\d+", reference)
    if not target:
        raise ValueError(f"retrieval reference without a paragraph number: {reference!r}")
    return _share_equal(re.findall(r"\d+", prediction), target[0])


def code_similarity(prediction: str, reference: str) -> float:
    """Similarity (difflib's ratio, in [0, 1]) of the reference line and the reply's first line of code (not
    empty, not a comment or a markdown fence)."""
    lines = [line for line in prediction.lstrip("\n").split("\n")
             if line.strip() and not line.strip().startswith(("`", "#", "//"))]
    return difflib.SequenceMatcher(None, lines[0] if lines else "", reference).ratio()


def score(item: LongItem, reply: str) -> float:
    """The item's LongBench score of ``reply`` in [0, 1]: its sub-dataset's metric, the best over its answers."""
    if item.dataset in FIRST_LINE:
        reply = reply.lstrip("\n").split("\n")[0]
    metric = METRICS[item.dataset]
    scores = []
    for answer in item.answers:
        if metric == "classification":
            scores.append(classification_score(reply, answer, item.all_classes))
        else:
            scores.append({"qa_f1": token_f1, "rouge_l": rouge_l, "count": count_score, "retrieval": retrieval_score,
                           "code_similarity": code_similarity}[metric](reply, answer))
    return max(scores)


# --------------------------------------------------------------------------- the run


@dataclass
class LongBenchRun:
    """A pair's models on LongBench: receiver, sharer, the C2C model fusing the sharer into the receiver (None: no
    ``c2c``), the prompts, the answer cap and T2T's message cap."""

    receiver: object
    receiver_tokenizer: object
    sharer: object
    sharer_tokenizer: object
    prompts: PromptFormat
    c2c: C2CModel | None = None
    max_new_tokens: int = 2048
    t2t_max_new_tokens: int = 256
    static_cache: bool | None = None

    def describe(self, method: str) -> dict:
        """What determines ``method``'s records (``T2T_MESSAGES``: the sharer's messages')."""
        code = code_version(__name__, "c2c.replies", "c2c.methods", "c2c.fused", "c2c.align", "c2c.fuser")
        out = {"prompts": self.prompts.describe(), "code": code}
        if method == T2T_MESSAGES:
            return {**out, "instruction": T2T_INSTRUCTION, "max_new_tokens": self.t2t_max_new_tokens,
                    "sharer": model_fingerprint(self.sharer),
                    "sharer_tokenizer": tokenizer_fingerprint(self.sharer_tokenizer)}
        if method not in METHODS:
            raise ValueError(f"unknown LongBench method {method!r}; known: {', '.join(METHODS)}")
        model, tokenizer = self._answering(method)
        out.update(method=method, max_new_tokens=self.max_new_tokens, model=model_fingerprint(model),
                   tokenizer=tokenizer_fingerprint(tokenizer))
        if method == "t2t":
            out["messages"] = {"block": T2T_BLOCK, **self.describe(T2T_MESSAGES)}
        if method == "c2c":
            out["sharers"] = [model_fingerprint(s) for s in self._fused().sharers]
            out["fusers"] = [fuser_fingerprint(f) for f in self._fused().fusers]
        return out

    def _answering(self, method: str) -> tuple:
        """The model and tokenizer that write ``method``'s answers (the receiver's, also for t2t and c2c)."""
        return (self.sharer, self.sharer_tokenizer) if method == "sharer" else (self.receiver, self.receiver_tokenizer)

    def _fused(self) -> C2CModel:
        if self.c2c is None:
            raise ValueError("method c2c needs a fuser: build the LongBenchRun with c2c=C2CModel(...)")
        return self.c2c

    def messages(self, items: Sequence[LongItem]) -> tuple[list[str], list[int]]:
        """T2T: the sharer's notes on each prompt."""
        prompts = [self.prompts.prompt(i) + T2T_INSTRUCTION for i in items]
        return generate_replies(self.sharer, self.sharer_tokenizer, prompts, self.t2t_max_new_tokens,
                                static_cache=self.static_cache, who="the sharer (T2T)")

    def replies(self, method: str, items: Sequence[LongItem],
                messages: Sequence[str] | None = None) -> tuple[list[str], list[int]]:
        if (method == "t2t") != (messages is not None):
            raise ValueError(f"method {method} {'needs' if method == 't2t' else 'takes no'} messages")
        prompts = [self.prompts.prompt(i) for i in items]
        if method == "t2t":
            prompts = [p + T2T_BLOCK.format(message=m) for p, m in zip(prompts, messages)]
        if method == "c2c":
            return generate_fused(self._fused(), prompts, self.max_new_tokens, static_cache=self.static_cache)
        return generate_replies(*self._answering(method), prompts, self.max_new_tokens, static_cache=self.static_cache,
                                who=f"the {'sharer' if method == 'sharer' else 'receiver'}")


def evaluate_longbench(run: LongBenchRun, items: Sequence[LongItem], out: str | os.PathLike, *,
                       methods: Sequence[str] = METHODS, batch_size: int = 1,
                       progress: bool = True) -> dict[str, list[dict]]:
    """Per-item records of each method (in item order: id, dataset, length, score, reply, its tokens, whether the
    cap cut it, seconds; t2t's also the sharer's message and its seconds), computed or reused from ``out``."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown LongBench methods {unknown}; known: {', '.join(METHODS)}")

    def answer(method, batch, messages):
        texts, counts = run.replies(method, batch, messages)
        return [{"id": i.id, "dataset": i.dataset, "length": i.length, "score": score(i, t), "reply": t,
                 "reply_tokens": n, "truncated": n >= run.max_new_tokens} for i, t, n in zip(batch, texts, counts)]

    return evaluate_methods(out, "LongBench evaluation", items, methods, describe=run.describe, answer=answer,
                            helper=HelperText(T2T_MESSAGES, "message", frozenset({"t2t"}), run.messages),
                            batch_size=batch_size, progress=progress)


def longbench_rows(records: dict[str, list[dict]], edges: Sequence[int] = BUCKET_EDGES) -> list[dict]:
    """One row per length bucket, then "Average" (all items, each counted once): n, each method's mean score x 100
    with its 95% interval and seconds per item (T2T's message included), PGR of T2T and C2C where receiver and
    sharer differ, and C2C's paired difference from the receiver and from T2T (x 100, 95% interval, exact sign test)."""
    if not records:
        raise ValueError("no methods' records")
    first = next(iter(records.values()))
    bucket = {r["id"]: bucket_of(r["length"], edges) for r in first}
    rows = []
    for label in [*bucket_labels(edges), "Average"]:
        ids = {i for i, b in bucket.items() if label == "Average" or b == label}
        row = {"bucket": label, "n": len(ids)}
        if not ids:
            rows.append(row)
            continue
        chosen = {m: [r for r in recs if r["id"] in ids] for m, recs in records.items()}
        for method, recs in chosen.items():
            row[method] = 100 * sum(r["score"] for r in recs) / len(recs)
            low, high = mean_interval([r["score"] for r in recs])
            row[f"{method}_low"], row[f"{method}_high"] = 100 * low, 100 * high
            row[f"{method}_seconds"] = sum(r["seconds"] + r.get("message_seconds", 0.0) for r in recs) / len(recs)
        for method in ("t2t", "c2c"):
            if method in row and "receiver" in row and "sharer" in row:
                gap = pgr(row[method], row["receiver"], row["sharer"])
                row[f"{method}_pgr"] = None if gap is None else 100 * gap
        for other in ("receiver", "t2t"):
            if "c2c" in chosen and other in chosen:
                row.update(paired_by_id(chosen["c2c"], chosen[other], field="score").columns(f"c2c_minus_{other}"))
        rows.append(row)
    return rows


def dataset_rows(records: dict[str, list[dict]]) -> list[dict]:
    """Each sub-dataset's n and mean score x 100 per method."""
    first = next(iter(records.values()))
    rows = []
    for name in dict.fromkeys(r["dataset"] for r in first):
        ids = {r["id"] for r in first if r["dataset"] == name}
        row = {"dataset": name, "metric": METRICS[name], "n": len(ids)}
        for method, recs in records.items():
            row[method] = 100 * sum(r["score"] for r in recs if r["id"] in ids) / len(ids)
        rows.append(row)
    return rows
