"""Tables 5 and 11 (LongBench by input length): loading, the split, prompts, the metrics against hand computations,
the four methods on the tiny pair, per-item records and the table."""

import json
import random
from functools import lru_cache

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import c2c.longbench
from c2c.fused import C2CModel
from c2c.longbench import (LONGBENCH_E, METRICS, LongBenchRun, LongItem, PromptFormat, bucket_labels, bucket_of,
                           classification_score, code_similarity, count_score, dataset_rows, evaluate_longbench,
                           load_longbench, longbench_rows, retrieval_score, rouge_l, score, split_items, tiny_longbench,
                           token_f1, training_conversations)
from conftest import count_calls, make_fuser


def test_thirteen_datasets_each_with_a_metric_and_a_prompt():
    assert len(LONGBENCH_E) == 13 and set(c2c.longbench.PROMPTS) == set(METRICS)
    assert all("{context}" in template for template in c2c.longbench.PROMPTS.values())


@pytest.mark.parametrize("prediction, reference, expected", [
    ("The cat sat", "a cat sat down", 0.8),  # words {cat, sat} of {cat, sat, down}: P 1, R 2/3
    ("Paris.", "paris", 1.0),
    ("London", "Paris", 0.0),
    ("the the the", "the", 0.0),  # articles are dropped: nothing left to match
    ("cat cat dog", "cat dog dog", 2 / 3),  # shared with multiplicity: cat 1, dog 1 of 3 each
])
def test_token_f1(prediction, reference, expected):
    assert token_f1(prediction, reference) == pytest.approx(expected)


def lcs_length(a, b):
    """Longest common subsequence by recursion with memo (an independent reference for rouge_l's table)."""
    @lru_cache(maxsize=None)
    def go(i, j):
        if i == len(a) or j == len(b):
            return 0
        return 1 + go(i + 1, j + 1) if a[i] == b[j] else max(go(i + 1, j), go(i, j + 1))

    return go(0, 0)


@pytest.mark.parametrize("seed", range(5))
def test_rouge_l_against_a_recursive_lcs(seed):
    rng = random.Random(seed)
    words = "a b c d e f".split()
    prediction = [rng.choice(words) for _ in range(rng.randint(1, 12))]
    reference = [rng.choice(words) for _ in range(rng.randint(1, 12))]
    common = lcs_length(tuple(prediction), tuple(reference))
    precision, recall = common / len(prediction), common / len(reference)
    expected = 0.0 if not common else 2 * precision * recall / (precision + recall)
    assert rouge_l(" ".join(prediction), ", ".join(reference).upper()) == pytest.approx(expected)


def test_the_other_metrics():
    classes = ["Description", "Description of manner", "Entity"]
    assert classification_score("Type: Description of manner", "Description of manner", classes) == 1.0
    assert classification_score("Entity or Description of manner", "Entity", classes) == 0.5
    assert classification_score("Entity", "Description", classes) == 0.0
    assert count_score("I count 12, not 11 or 12", "12") == pytest.approx(2 / 3)
    assert count_score("many", "12") == 0.0
    assert retrieval_score("Paragraph 7", "Paragraph 7") == 1.0
    assert retrieval_score("Paragraph 17", "Paragraph 7") == 0.0
    with pytest.raises(ValueError, match="without a paragraph number"):
        retrieval_score("Paragraph 7", "no number")
    assert code_similarity("```python\n# next\n    x = 1\n", "    x = 1") == 1.0  # fences and comments skipped
    assert 0.0 < code_similarity("x = 2", "x = 1") < 1.0 and code_similarity("", "x = 1") == 0.0


def test_score_takes_the_first_line_of_few_shot_replies_and_the_best_answer():
    item = LongItem("triviaqa/1", "triviaqa", "ctx", "q", ("Paris", "City of Light"), 10)
    assert score(item, "\nParis\nQuestion: next one") == 1.0
    assert score(item, "Lyon\nParis") == 0.0  # only the first line counts in a few-shot format
    qa = LongItem("hotpotqa/1", "hotpotqa", "ctx", "q", ("Paris", "City of Light"), 10)
    assert score(qa, "city of light") == 1.0


def test_buckets():
    assert bucket_labels() == ["0-4k", "4-8k", "8k+"] and bucket_labels((60, 120)) == ["0-60", "60-120", "120+"]
    assert [bucket_of(n) for n in (0, 3999, 4000, 7999, 8000, 30000)] == ["0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+"]
    with pytest.raises(ValueError, match="increasing"):
        bucket_labels((8000, 4000))


def write_longbench_folder(folder, per_dataset=3):
    folder.mkdir()
    for name in LONGBENCH_E:
        rows = [{"input": f"q{i}", "context": f"context {i}", "answers": [f"a{i}"], "length": 1000 * i,
                 "dataset": f"{name}_e", "language": "en", "all_classes": None, "_id": f"id{i}"}
                for i in range(per_dataset)]
        (folder / f"{name}_e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_load_a_local_copy_and_errors(tmp_path):
    write_longbench_folder(tmp_path / "data")
    items = load_longbench(tmp_path / "data")
    assert len(items) == 39 and items[0] == LongItem("qasper/id0", "qasper", "context 0", "q0", ("a0",), 0)
    assert [i.dataset for i in load_longbench(tmp_path / "data", ["trec", "lcc"], limit_per_dataset=2)] == \
        ["trec", "trec", "lcc", "lcc"]
    one_file = tmp_path / "mixed.jsonl"
    one_file.write_text((tmp_path / "data" / "trec_e.jsonl").read_text())
    assert len(load_longbench(one_file, ["trec"])) == 3
    with pytest.raises(ValueError, match="holds no items of"):
        load_longbench(one_file, ["lcc"])
    parquet = tmp_path / "trec.parquet"  # any data file the benchmarks read (c2c.benchmark_files.read_file)
    pq.write_table(pa.Table.from_pylist([json.loads(line) for line in one_file.read_text().splitlines()]), parquet)
    assert load_longbench(parquet, ["trec"]) == load_longbench(one_file, ["trec"])
    with pytest.raises(ValueError, match="unknown LongBench-E datasets"):
        load_longbench(tmp_path / "data", ["narrativeqa"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_longbench(tmp_path / "missing")
    (tmp_path / "data" / "lcc_e.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="has no lcc_e.jsonl"):
        load_longbench(tmp_path / "data")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"dataset": "trec_e", "input": "q"}) + "\n")
    with pytest.raises(ValueError, match="missing LongBench field"):
        load_longbench(bad, ["trec"])


def test_the_hub_loader_names_the_dataset_and_the_fix(monkeypatch):
    asked = []

    def fail(name, config, split):
        asked.append((name, config, split))
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(RuntimeError, match="THUDM/LongBench qasper_e.*unpack it and give its folder"):
        load_longbench("hub", ["qasper"])
    assert asked == [("THUDM/LongBench", "qasper_e", "test")]


def test_split_is_per_dataset_disjoint_and_seeded():
    items = load_longbench("tiny-fixtures")
    train, held_out = split_items(items, 0.25, seed=42)
    assert {i.id for i in train}.isdisjoint({i.id for i in held_out}) and len(train) + len(held_out) == len(items)
    assert all(sum(i.dataset == name for i in held_out) == 1 for name in LONGBENCH_E)  # round(0.25 x 4) per dataset
    assert split_items(items, 0.25, seed=42) == (train, held_out)
    assert split_items(items, 0.25, seed=1) != (train, held_out)
    with pytest.raises(ValueError, match="eval_fraction"):
        split_items(items, 1.0)


def test_prompts_keep_the_head_and_tail_of_a_long_text(tiny_receiver, tmp_path):
    tokenizer = tiny_receiver[1]
    prompts = PromptFormat(tokenizer, max_prompt_tokens=40)
    item = LongItem("qasper/x", "qasper", " ".join(f"w{i}" for i in range(300)), "What?", ("a",), 300)
    full = c2c.longbench.PROMPTS["qasper"].format(context=item.context, input=item.input)
    cut = prompts.prompt(item)
    assert len(tokenizer(cut, add_special_tokens=False).input_ids) <= 41  # the two halves may merge one token
    assert cut.startswith(full[:20]) and cut.endswith("Question: What?\nAnswer:")
    short = LongItem("qasper/y", "qasper", "tiny", "What?", ("a",), 1)
    roomy = PromptFormat(tokenizer, max_prompt_tokens=5000)
    assert roomy.prompt(short) == c2c.longbench.PROMPTS["qasper"].format(context="tiny", input="What?")
    assert roomy.prompt(item) == full
    official = tmp_path / "dataset2prompt.json"
    official.write_text(json.dumps({name: "OFFICIAL {context} | {input}" for name in LONGBENCH_E}))
    assert PromptFormat.from_file(tokenizer, 400, official).prompt(short) == "OFFICIAL tiny | What?"
    official.write_text(json.dumps({"qasper": "{context}"}))
    with pytest.raises(ValueError, match="has no template for"):
        PromptFormat.from_file(tokenizer, 400, official)
    with pytest.raises(FileNotFoundError, match="dataset2prompt.json"):
        PromptFormat.from_file(tokenizer, 400, tmp_path / "missing.json")


def test_training_conversations_fit_max_length(tiny_receiver):
    tokenizer = tiny_receiver[1]
    prompts = PromptFormat(tokenizer, max_prompt_tokens=1000)
    items = tiny_longbench(per_dataset=2, words=(150, 300))
    chats = training_conversations(items, prompts, max_length=120)
    assert len(chats) == len(items)
    for chat, item in zip(chats, items):
        assert [m["role"] for m in chat] == ["user", "assistant"] and chat[1]["content"] == item.answers[0]
        rendered = tokenizer.apply_chat_template(chat, tokenize=True, enable_thinking=False)
        ids = rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered
        assert len(ids) <= 120
    with pytest.raises(ValueError, match="leaves no room"):
        training_conversations(items[:1], prompts, max_length=60, margin=60)


def run_for(tiny_receiver, tiny_sharer, gate_logit=1.0, **options):
    (r, rt), (s, st) = tiny_receiver, tiny_sharer
    fused = C2CModel(r, rt, [s], [st], [make_fuser(r, s, seed=5, gate_logit=gate_logit).to(r.device)])
    return LongBenchRun(r, rt, s, st, PromptFormat(rt, 200), fused,
                        **{"max_new_tokens": 6, "t2t_max_new_tokens": 5, **options})


def closed_gates_reproduce_the_receiver(receiver, sharer, static_cache):
    """C2C through closed gates answers as the receiver alone, token for token; open gates change the answers."""
    run = run_for(receiver, sharer, gate_logit=-1.0, static_cache=static_cache)
    items = tiny_longbench(per_dataset=1)[:4]
    assert run.replies("c2c", items) == run.replies("receiver", items)
    opened = run_for(receiver, sharer, static_cache=static_cache)
    assert opened.replies("c2c", items) != run.replies("receiver", items)


@pytest.mark.parametrize("static_cache", [None, True], ids=["dynamic-cache", "static-cache"])
def test_closed_gates_reproduce_the_receiver_alone(tiny_receiver, tiny_sharer, static_cache):
    closed_gates_reproduce_the_receiver(tiny_receiver, tiny_sharer, static_cache)


@pytest.mark.parametrize("method", ["receiver", "c2c"])
def test_batched_replies_equal_batch_one(method, tiny_receiver, tiny_sharer):
    run = run_for(tiny_receiver, tiny_sharer)
    items = tiny_longbench(per_dataset=1, words=(10, 150))[:3]
    texts, counts = run.replies(method, items)
    one_by_one = [run.replies(method, [item]) for item in items]
    assert texts == [t[0] for t, _ in one_by_one] and counts == [n[0] for _, n in one_by_one]


def test_records_resume_and_refuse_another_setup(tmp_path, tiny_receiver, tiny_sharer, monkeypatch):
    run = run_for(tiny_receiver, tiny_sharer)
    items = tiny_longbench(per_dataset=1)[:5]
    first = evaluate_longbench(run, items[:3], tmp_path, batch_size=2, progress=False)
    assert list(first) == ["receiver", "sharer", "t2t", "c2c"]
    for method, records in first.items():
        assert [r["id"] for r in records] == [i.id for i in items[:3]]
        assert all(r["score"] == score(i, r["reply"]) and 0 <= r["score"] <= 1 for r, i in zip(records, items))
        assert all(("message" in r) == (method == "t2t") for r in records)
    calls = count_calls(monkeypatch, LongBenchRun, "replies")
    again = evaluate_longbench(run, items, tmp_path, batch_size=2, progress=False)
    assert sorted(calls) == sorted([(m, 2) for m in ("receiver", "sharer", "t2t", "c2c")])  # only the 2 new items
    assert all(again[m][:3] == first[m] for m in first)
    assert len((tmp_path / "t2t_messages.jsonl").read_text().splitlines()) == 5
    with pytest.raises(ValueError, match="made with other max_new_tokens"):
        evaluate_longbench(run_for(tiny_receiver, tiny_sharer, max_new_tokens=7), items, tmp_path,
                           methods=["receiver"], progress=False)
    other_prompts = run_for(tiny_receiver, tiny_sharer)
    other_prompts.prompts = PromptFormat(tiny_receiver[1], 100)
    with pytest.raises(ValueError, match="made with other prompts"):
        evaluate_longbench(other_prompts, items, tmp_path, methods=["receiver"], progress=False)
    with pytest.raises(ValueError, match="share an id"):
        evaluate_longbench(run, [items[0], items[0]], tmp_path / "twice", methods=["receiver"], progress=False)
    with pytest.raises(ValueError, match="c2c needs a fuser"):
        evaluate_longbench(LongBenchRun(*tiny_receiver, *tiny_sharer, PromptFormat(tiny_receiver[1], 200)), items,
                           tmp_path / "other", methods=["c2c"], progress=False)


def test_rows_against_a_hand_computation():
    lengths = [100, 5000, 9000, 9500]

    def recs(scores, seconds=1.0):
        return [{"id": str(i), "dataset": "qasper" if i < 2 else "trec", "length": n, "score": s, "seconds": seconds}
                for i, (n, s) in enumerate(zip(lengths, scores))]

    records = {"receiver": recs([0.0, 0.5, 0.25, 0.25]), "sharer": recs([1.0, 1.0, 0.75, 0.75]),
               "t2t": recs([0.5, 0.5, 0.5, 0.5]), "c2c": recs([1.0, 0.5, 0.0, 0.5])}
    rows = {r["bucket"]: r for r in longbench_rows(records)}
    assert [r["n"] for r in rows.values()] == [1, 1, 2, 4]
    assert rows["8k+"]["c2c"] == 25.0 and rows["8k+"]["receiver"] == 25.0 and rows["8k+"]["c2c_pgr"] == 0.0
    average = rows["Average"]
    assert average["receiver"] == 25.0 and average["c2c"] == 50.0 and average["sharer"] == 87.5
    assert average["c2c_pgr"] == pytest.approx(100 * 25 / 62.5) and average["t2t_pgr"] == pytest.approx(100 * 25 / 62.5)
    # c2c - receiver per item: +1, 0, -0.25, +0.25; mean 0.25; 2 items up, 1 down: sign test 2 x P(X <= 1 | 3) = 1
    assert average["c2c_minus_receiver"] == pytest.approx(25.0) and average["c2c_minus_receiver_p"] == 1.0
    assert average["c2c_minus_receiver_low"] < 25.0 < average["c2c_minus_receiver_high"]
    assert average["c2c_seconds"] == 1.0
    by_dataset = {r["dataset"]: r for r in dataset_rows(records)}
    assert by_dataset["qasper"]["c2c"] == 75.0 and by_dataset["trec"]["n"] == 2
    assert by_dataset["trec"]["metric"] == "classification"


def test_load_tokenizer_reads_a_tiny_model():
    tokenizer = c2c.longbench.load_tokenizer("tiny-receiver")
    assert tokenizer("word", add_special_tokens=False).input_ids
