"""Venn regions of the items answered correctly by three methods, against a brute-force count."""

import random

import pytest

from c2c.overlap import venn_counts


def test_regions_partition_the_common_items():
    rng = random.Random(0)
    ids = [f"q{i}" for i in range(200)]
    truth = {name: {i: rng.random() < p for i in ids} for name, p in (("receiver", 0.3), ("sharer", 0.6), ("c2c", 0.5))}
    records = {name: [{"id": i, "correct": c} for i, c in answers.items()] for name, answers in truth.items()}
    records["c2c"] = records["c2c"][:150]  # answered only the first 150: regions are over common items
    out = venn_counts(records)
    common = ids[:150]
    assert out["names"] == ("receiver", "sharer", "c2c") and out["items"] == 150
    assert len(out["regions"]) == 8 and sum(out["regions"].values()) == 150
    brute = {}
    for i in common:
        flags = tuple(truth[n][i] for n in ("receiver", "sharer", "c2c"))
        brute[flags] = brute.get(flags, 0) + 1
    for region, flags in out["membership"].items():
        assert out["regions"][region] == brute.get(flags, 0), region
    assert out["membership"]["receiver only"] == (True, False, False)
    assert out["membership"]["sharer & c2c only"] == (False, True, True)
    assert out["membership"]["all three"] == (True, True, True) and out["membership"]["none"] == (False,) * 3
    sharer_right = [i for i in common if truth["sharer"][i]]
    assert out["sharer_correct_also_c2c"] == pytest.approx(sum(truth["c2c"][i] for i in sharer_right) / len(sharer_right))


def test_bad_inputs():
    one = [{"id": "a", "correct": True}]
    with pytest.raises(ValueError, match="3 methods"):
        venn_counts({"a": one, "b": one})
    with pytest.raises(ValueError, match="no item in common"):
        venn_counts({"a": one, "b": one, "c": [{"id": "b", "correct": True}]})
