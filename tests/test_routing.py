"""The routing baseline's offline stand-in (c2c.routing), against a brute-force reading of its definition."""

import math
import random

import pytest

from c2c.routing import receiver_confidence, route


def _records(seed: int, n: int, accuracy: float, seconds: float) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scores = {letter: rng.gauss(0, 2) for letter in "ABCD"}
        out.append({"id": f"q{i}", "correct": rng.random() < accuracy, "scores": scores, "seconds": seconds})
    return out


def test_confidence_is_the_softmax_probability_of_the_top_letter():
    record = {"id": "x", "scores": {"A": math.log(0.5), "B": math.log(0.25), "C": math.log(0.25)}}
    assert receiver_confidence(record) == pytest.approx(0.5)
    shifted = {"id": "x", "scores": {k: v - 7.0 for k, v in record["scores"].items()}}  # unnormalised log-probs
    assert receiver_confidence(shifted) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="scoring: logits"):
        receiver_confidence({"id": "x", "scores": None, "error": "RuntimeError: boom"})


@pytest.mark.parametrize("sharer_accuracy", [0.9, 0.1])
def test_half_the_queries_go_to_the_strong_model_ranked_by_the_receivers_confidence(sharer_accuracy):
    receiver, sharer = _records(0, 101, 0.4, 1.0), _records(1, 101, sharer_accuracy, 3.0)
    routed = route(receiver, sharer)
    assert [r["id"] for r in routed] == [r["id"] for r in receiver]
    sharer_strong = sum(r["correct"] for r in sharer) > sum(r["correct"] for r in receiver)
    strong = "sharer" if sharer_strong else "receiver"
    assert sum(r["routed_to"] == strong for r in routed) == round(0.5 * 101)
    # brute force: the strong model's queries are the least (sharer strong) / most (receiver strong) confident
    conf = {r["id"]: receiver_confidence(r) for r in receiver}
    to_strong = [conf[r["id"]] for r in routed if r["routed_to"] == strong]
    to_weak = [conf[r["id"]] for r in routed if r["routed_to"] != strong]
    assert (max(to_strong) <= min(to_weak)) if sharer_strong else (min(to_strong) >= max(to_weak))
    by_id = {"receiver": {r["id"]: r for r in receiver}, "sharer": {r["id"]: r for r in sharer}}
    for r in routed:
        assert r["correct"] == by_id[r["routed_to"]][r["id"]]["correct"]
        assert r["seconds"] == (4.0 if r["routed_to"] == "sharer" else 1.0)  # the receiver always runs first
        assert r["confidence"] == pytest.approx(conf[r["id"]])


def test_all_or_nothing_routing_is_the_strong_or_the_weak_model():
    receiver, sharer = _records(2, 40, 0.3, 1.0), _records(3, 40, 0.8, 1.0)
    assert [r["correct"] for r in route(receiver, sharer, strong_share=1.0)] == [r["correct"] for r in sharer]
    assert [r["correct"] for r in route(receiver, sharer, strong_share=0.0)] == [r["correct"] for r in receiver]


def test_routing_refuses_missing_answers_and_bad_shares():
    receiver, sharer = _records(4, 10, 0.5, 1.0), _records(5, 10, 0.5, 1.0)
    with pytest.raises(ValueError, match="sharer has no record of 1 items"):
        route(receiver, sharer[1:])
    with pytest.raises(ValueError, match="strong_share"):
        route(receiver, sharer, strong_share=1.5)
