"""MMLU subcategories: the subject map, per-subcategory accuracy, and paired gains."""

import pytest

from c2c.benchmarks import MMLU_SUBJECTS
from c2c.subcategories import SUBCATEGORIES, SUBCATEGORY, subcategory_accuracy, subcategory_gain, subcategory_of


def test_every_mmlu_subject_maps_to_exactly_one_of_the_17_subcategories():
    assert len(MMLU_SUBJECTS) == 57 and sorted(SUBCATEGORY) == sorted(MMLU_SUBJECTS)
    assert all(isinstance(SUBCATEGORY[s], str) and SUBCATEGORY[s] in SUBCATEGORIES for s in MMLU_SUBJECTS)
    assert len(SUBCATEGORIES) == len(set(SUBCATEGORIES)) == 17
    assert set(SUBCATEGORY.values()) == set(SUBCATEGORIES)  # none of the 17 is empty
    # the paper's Figure 8 spokes, in its own order
    assert set(SUBCATEGORIES) == {"physics", "computer science", "culture", "psychology", "math", "philosophy",
                                  "other", "politics", "health", "history", "geography", "business", "engineering",
                                  "biology", "chemistry", "economics", "law"}
    # spot checks against MMLU's categories.py
    assert [subcategory_of(s) for s in ("astronomy", "professional_accounting", "human_sexuality", "public_relations",
                                        "formal_logic", "electrical_engineering", "high_school_statistics")] == [
        "physics", "other", "culture", "politics", "philosophy", "engineering", "math"]
    with pytest.raises(ValueError, match="57 subjects"):
        subcategory_of("ARC-Challenge")


def rec(i, subject, correct):
    return {"id": str(i), "subject": subject, "correct": correct}


def test_accuracy_and_paired_gain():
    records = {
        "receiver": [rec(0, "anatomy", True), rec(1, "virology", False), rec(2, "college_physics", False),
                     rec(3, "astronomy", False)],
        "c2c": [rec(0, "anatomy", True), rec(1, "virology", True), rec(2, "college_physics", True),
                rec(3, "astronomy", False)],
        "t2t": [rec(1, "virology", True), rec(3, "astronomy", True)],  # a subset of the items
    }
    accuracy = {(r["subcategory"], r["method"]): (r["accuracy"], r["n"]) for r in subcategory_accuracy(records)}
    assert accuracy[("health", "receiver")] == (0.5, 2) and accuracy[("health", "c2c")] == (1.0, 2)
    assert accuracy[("physics", "c2c")] == (0.5, 2) and accuracy[("physics", "t2t")] == (1.0, 1)
    assert {sub for sub, _ in accuracy} == {"health", "physics"}
    assert [r["subcategory"] for r in subcategory_accuracy(records)][0] == "physics"  # the paper's order
    gain = {(r["subcategory"], r["method"]): (r["gain"], r["n"]) for r in subcategory_gain(records)}
    assert gain[("health", "c2c")] == (0.5, 2) and gain[("physics", "c2c")] == (0.5, 2)
    assert gain[("health", "t2t")] == (1.0, 1)  # on the one health item T2T answered: 1 - 0
    assert gain[("physics", "t2t")] == (1.0, 1)
    assert ("health", "receiver") not in gain
    with pytest.raises(ValueError, match="baseline"):
        subcategory_gain({"c2c": records["c2c"]})
