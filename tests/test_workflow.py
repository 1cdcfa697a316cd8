"""Table 15's GSM8K workflow: answer parsing, loading, the four methods on the tiny pair, records and the table."""

import json

import pytest
import torch

import c2c.workflow
from c2c.fused import C2CModel, ContextLengthError
from c2c.offline import fetch_offline_benchmarks, find_offline_files
from c2c.workflow import (MathItem, Workflow, evaluate_workflow, extract_number, gold_number, load_gsm8k,
                          normalise_number, solver_prompt, tiny_problems, workflow_from_fuser, workflow_rows)
from conftest import count_calls, make_fuser


@pytest.mark.parametrize("text, number", [("18", "18"), ("$1,234.50", "1234.5"), ("18.", "18"), ("-3", "-3"),
                                          ("2.000", "2"), ("0.25", "0.25"), ("abc", None), ("", None)])
def test_normalise_number(text, number):
    assert normalise_number(text) == number


@pytest.mark.parametrize("reply, number", [
    ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\nThe answer is 18", "18"),
    ("So she makes $18 a day. The answer is: $1,018.", "1018"),
    ("First 3 + 4 = 7. #### 7", "7"),
    ("The answer is 12, not 10. Check: 12 - 2 = 10", "12"),  # the announced answer wins over a later number
    ("5 apples and 7 pears make 12 fruits", "12"),  # no announcement: the last number
    ("The answer is **42**", "42"),
    ("The answer is:\n\\[ \\boxed{540} \\]", "540"),  # Qwen's LaTeX ending
    ("so 8 + 2 = 10 and \\(\\boxed{1,000}\\) is wrong? No: the answer is 10", "1000"),  # a box wins over the text
    ("The answer is:\n\\[ 540 \\]", "540"),
    ("the answer is the number of apples, 7", "7"),  # no number right after "answer is": the last number
    ("I cannot tell.", None),
])
def test_extract_number(reply, number):
    assert extract_number(reply) == number


def test_gold_number_needs_the_final_line():
    assert gold_number("9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "x") == "18"
    assert gold_number("#### 1,000", "x") == "1000"
    with pytest.raises(ValueError, match="x: the answer does not end in '#### <number>'"):
        gold_number("The answer is 18", "x")


def test_load_gsm8k_local_file_and_errors(tmp_path):
    path = tmp_path / "gsm8k_test.jsonl"
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_gsm8k(path, limit=3)
    assert items == [MathItem(str(i), f"What is {i} + 1?", str(i + 1)) for i in range(3)]
    assert len(load_gsm8k(path)) == 5
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gsm8k(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad_test.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match="no field 'answer'"):
        load_gsm8k(bad)
    with pytest.raises(ValueError, match="limit must be a positive int"):
        load_gsm8k(path, limit=0)


def test_offline_gsm8k_is_the_test_split():
    files = find_offline_files(fetch_offline_benchmarks())
    items = load_gsm8k("offline")
    assert files["gsm8k"].exists() and len(items) == 1319 and len({i.id for i in items}) == 1319
    assert items[0].question.startswith("Janet") and items[0].answer == "18"
    assert all(normalise_number(i.answer) == i.answer for i in items)
    with pytest.raises(ValueError, match="test split only"):
        load_gsm8k("offline", split="train")


def test_tiny_problems_are_solvable():
    items = tiny_problems(6)
    assert len({i.id for i in items}) == 6 and load_gsm8k("tiny-fixtures", limit=3) == items[:3]
    for item in items:
        a, b, c = map(int, [w for w in item.question.replace(".", " ").split() if w.isdigit()])
        assert item.answer == str(a + b - c)


def workflow_for(tiny_receiver, tiny_sharer, gate_logit=1.0, **options):
    (r, rt), (s, st) = tiny_receiver, tiny_sharer
    fused = C2CModel(r, rt, [s], [st], [make_fuser(r, s, seed=5, gate_logit=gate_logit)])
    return Workflow(r, rt, s, st, fused, **{"max_new_tokens": 6, "interpreter_max_new_tokens": 5, **options})


def test_closed_gates_reproduce_the_solver_alone(tiny_receiver, tiny_sharer):
    """A fuser whose gates are all closed leaves the solver's cache as it is: C2C == single and T-C2C == T2T,
    token for token, on a padded batch."""
    workflow = workflow_for(tiny_receiver, tiny_sharer, gate_logit=-1.0)
    items = tiny_problems(4)
    analyses, counts = workflow.analyses(items)
    assert all(1 <= n <= 5 for n in counts)
    assert workflow.solve("c2c", items) == workflow.solve("single", items)
    assert workflow.solve("t_c2c", items, analyses) == workflow.solve("t2t", items, analyses)
    open_gates = workflow_for(tiny_receiver, tiny_sharer, gate_logit=1.0)
    assert open_gates.solve("c2c", items) != workflow.solve("single", items)  # open gates do change the replies


@pytest.mark.parametrize("method", ["single", "c2c"])
def test_batched_replies_equal_batch_one(method, tiny_receiver, tiny_sharer):
    workflow = workflow_for(tiny_receiver, tiny_sharer)
    items = [MathItem("long", "word " * 40 + "How many?", "1")] + tiny_problems(3)
    texts, counts = workflow.solve(method, items)
    one_by_one = [workflow.solve(method, [item]) for item in items]
    assert texts == [t[0] for t, _ in one_by_one] and counts == [n[0] for _, n in one_by_one]


def test_workflow_from_a_fuser_folder(tmp_path, tiny_receiver, tiny_sharer):
    """The pair is the one the fuser names; the eval config gives dtype and device; the fused replies are those of
    a C2CModel built by hand from the same fuser."""
    fuser = make_fuser(tiny_receiver[0], tiny_sharer[0], seed=7, gate_logit=1.0)
    fuser.config.receiver, fuser.config.sharer, fuser.config.alignment = "tiny-receiver", "tiny-sharer", "longest"
    fuser.save_pretrained(tmp_path / "fuser")
    settings = {"dtype": "float32", "device": "cpu", "receiver": "tiny-receiver", "methods": ["receiver"],
                "benchmarks": ["arc-challenge"]}
    loaded = workflow_from_fuser(tmp_path / "fuser", settings, max_new_tokens=6, interpreter_max_new_tokens=5)
    assert loaded.receiver.dtype == torch.float32 and loaded.static_cache is None
    by_hand = workflow_for(tiny_receiver, tiny_sharer)
    by_hand.c2c.fusers[0].load_state_dict(fuser.state_dict())
    items = tiny_problems(3)
    assert loaded.solve("c2c", items) == by_hand.solve("c2c", items)
    fuser.config.receiver = None
    fuser.save_pretrained(tmp_path / "nameless")
    with pytest.raises(ValueError, match="does not name the receiver and sharer"):
        workflow_from_fuser(tmp_path / "nameless", settings)


def test_solve_checks_its_inputs(tiny_receiver, tiny_sharer):
    workflow = workflow_for(tiny_receiver, tiny_sharer)
    with pytest.raises(ValueError, match="t2t needs analyses"):
        workflow.solve("t2t", tiny_problems(1))
    without_fuser = Workflow(*tiny_receiver, *tiny_sharer)
    with pytest.raises(ValueError, match="c2c needs a fuser"):
        without_fuser.solve("c2c", tiny_problems(1))
    assert solver_prompt(tiny_problems(1)[0], "abc").endswith("analysis of the problem:\nabc")
    too_long = [MathItem("long", "word " * 1200 + "How many?", "1")]  # the tiny models' context is 1,024 tokens
    with pytest.raises(ContextLengthError, match="the solver"):
        workflow.solve("single", too_long)


def test_records_resume_and_refuse_another_setup(tmp_path, tiny_receiver, tiny_sharer, monkeypatch):
    workflow = workflow_for(tiny_receiver, tiny_sharer)
    items = tiny_problems(5)
    first = evaluate_workflow(workflow, items[:3], tmp_path, batch_size=2, progress=False)
    assert set(first) == {"single", "t2t", "c2c", "t_c2c"}
    for method, records in first.items():
        assert [r["id"] for r in records] == [i.id for i in items[:3]]
        assert all(r["gold"] == i.answer and isinstance(r["correct"], bool) for r, i in zip(records, items))
        assert all(("analysis_seconds" in r) == ("analysis" in r) == (method in ("t2t", "t_c2c")) for r in records)
        assert all(r["truncated"] == (r["reply_tokens"] >= 6) for r in records)  # the cap: workflow_for's 6 tokens
    calls = count_calls(monkeypatch, Workflow, "solve")
    again = evaluate_workflow(workflow, items, tmp_path, batch_size=2, progress=False)
    assert sorted(calls) == sorted([(m, 2) for m in ("single", "t2t", "c2c", "t_c2c")])  # only the 2 new items
    assert all(again[m][:3] == first[m] for m in first)
    assert len((tmp_path / "interpreter.jsonl").read_text().splitlines()) == 5
    longer = workflow_for(tiny_receiver, tiny_sharer, max_new_tokens=7)
    with pytest.raises(ValueError, match="made with other max_new_tokens"):
        evaluate_workflow(longer, items, tmp_path, methods=["single"], progress=False)
    with pytest.raises(ValueError, match="unknown workflow methods"):
        evaluate_workflow(workflow, items, tmp_path, methods=["routing"], progress=False)


def test_rows_against_a_hand_computation():
    def recs(correct, seconds, interpreter=None):
        return [{"id": str(i), "correct": c, "predicted": None if c is None else "1", "seconds": seconds,
                 "reply_tokens": 10, "truncated": i == 0, **({"analysis_seconds": interpreter} if interpreter else {})}
                for i, c in enumerate(correct)]

    single = recs([True, False, False, False], 1.0)
    t2t = recs([True, True, True, None], 2.0, interpreter=3.0)
    t2t[3]["correct"] = False
    rows = {r["method"]: r for r in workflow_rows({"single": single, "t2t": t2t})}
    assert rows["single"]["accuracy"] == 25.0 and "minus_single" not in rows["single"]
    assert rows["t2t"]["accuracy"] == 75.0 and rows["t2t"]["minus_single"] == 50.0
    assert rows["t2t"]["minus_single_p"] == 0.5  # 2 discordant items, both for T2T: 2 * (1/2)^2
    assert rows["t2t"]["seconds_per_query"] == 5.0 and rows["t2t"]["unparsed"] == 1 and rows["t2t"]["truncated"] == 1
    assert rows["single"]["accuracy_ci95_low"] < 25.0 < rows["single"]["accuracy_ci95_high"]
    assert c2c.workflow.LABELS[rows["t2t"]["method"]].startswith("T2T")
