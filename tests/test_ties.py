"""Ties between answer letters: the tie-split accuracy equals the mean over every tie-breaking order."""

import csv
import json
import itertools

import pytest

from c2c.ties import main, run_ties, tie_summary, tied_letters

LETTERS = "ABCD"


def record(gold, scores):
    pred = next(L for L in LETTERS if L in scores and scores[L] == max(scores.values()))  # first on ties
    return {"id": f"x/{gold}{sorted(scores.items())}", "gold": gold, "pred": pred, "correct": pred == gold,
            "scores": scores}


RECORDS = [
    record("A", {"A": -1.0, "B": -2.0, "C": -3.0, "D": -4.0}),   # no tie, right
    record("B", {"A": -1.0, "B": -1.0, "C": -3.0, "D": -4.0}),   # A = B, gold B: recorded wrong, 1/2
    record("C", {"A": -0.5, "B": -0.5, "C": -0.5, "D": -4.0}),   # three-way tie with gold: 1/3
    record("D", {"A": -2.0, "B": -2.0, "C": -3.0, "D": -4.0}),   # tie without gold: 0
    record("A", {"A": -1.0, "B": -1.0, "C": -9.0, "D": -9.0}),   # A = B, gold A: recorded right, 1/2
    {"id": "x/raised", "gold": "A", "pred": None, "correct": False, "scores": {}},  # raised: wrong in both
]


def test_tied_letters():
    assert tied_letters({"A": 1.0, "B": 0.0}) == ["A"]
    assert tied_letters({"A": 0.0, "B": 1.0, "C": 1.0}) == ["B", "C"]


def test_tie_split_equals_the_mean_over_all_tie_breaking_orders():
    summary = tie_summary(RECORDS)
    assert (summary["items"], summary["tied"], summary["gold_among_tied"]) == (6, 4, 3)
    assert summary["accuracy"] == pytest.approx(100 * 2 / 6)
    # independent reference: break ties by each of the 24 letter priorities, average the accuracies
    accuracies = []
    for order in itertools.permutations(LETTERS):
        right = 0
        for r in RECORDS:
            if r["scores"]:
                best = max(r["scores"].values())
                right += next(L for L in order if r["scores"].get(L) == best) == r["gold"]
        accuracies.append(right / len(RECORDS))
    assert summary["tie_split_accuracy"] == pytest.approx(100 * sum(accuracies) / len(accuracies), abs=1e-12)
    assert summary["tie_split_accuracy"] == pytest.approx(100 * (1 + 1 / 2 + 1 / 3 + 0 + 1 / 2) / 6)


def test_cli_writes_a_table_per_method_and_benchmark(tmp_path):
    for key in ("receiver", "c2c"):
        folder = tmp_path / "eval" / key
        folder.mkdir(parents=True)
        (folder / "mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert main(["--eval-out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "ties.csv").open()))
    assert [(r["method"], r["benchmark"], r["tied"]) for r in rows] == [("c2c", "mmlu", "4"), ("receiver", "mmlu", "4")]
    assert rows == [{k: str(v) for k, v in row.items()} for row in run_ties(tmp_path)]
    assert "| c2c | mmlu | 6 | 4 | 3 | 33.3333 | 38.8889 |" in (tmp_path / "ties.md").read_text()


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="at least one record"):
        tie_summary([])
    with pytest.raises(FileNotFoundError, match="run the evaluation first"):
        run_ties(tmp_path)
