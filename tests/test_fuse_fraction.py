"""Fusing part of the prompt: the mask, and its two ends (p = 0 is the receiver alone, p = 1 full C2C) exactly."""

import pytest
import torch

from c2c.benchmarks import load_benchmark, write_tiny_fixtures
from c2c.evaluate import evaluate
from c2c.fuse_fraction import PartialC2C, partial_fuse_mask
from c2c.methods import C2C, ReceiverAlone
from conftest import make_fuser


def test_partial_mask_keeps_the_front_or_the_back():
    # row 0: left padding, then fusable positions 2..6 (the last column is never fused) -> m = 5
    # row 1: an unfused (template) position 3 in the middle -> fusable 0, 1, 2, 4, 5, 6 -> m = 6
    fuse = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 1, 1]]).bool()
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])

    def kept(fraction, side):
        return [row.nonzero().flatten().tolist() for row in partial_fuse_mask(fuse, attention, fraction, side)]

    assert kept(0.0, "former") == [[], []] == kept(0.0, "latter")
    assert kept(1.0, "former") == [[2, 3, 4, 5, 6], [0, 1, 2, 4, 5, 6]] == kept(1.0, "latter")
    assert kept(0.5, "former") == [[2, 3, 4], [0, 1, 2]]  # round(2.5) = 3 (half up), round(3) = 3
    assert kept(0.5, "latter") == [[4, 5, 6], [4, 5, 6]]
    assert kept(0.25, "former") == [[2], [0, 1]]  # 1.25 -> 1, 1.5 -> 2
    assert kept(0.75, "latter") == [[3, 4, 5, 6], [1, 2, 4, 5, 6]]  # 3.75 -> 4, 4.5 -> 5
    assert fuse[0, 0] == 0 and fuse[1, -1]  # the input is not modified
    with pytest.raises(ValueError, match="fraction"):
        partial_fuse_mask(fuse, attention, 1.5, "former")
    with pytest.raises(ValueError, match="side"):
        partial_fuse_mask(fuse, attention, 0.5, "middle")


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    folders = write_tiny_fixtures(tmp_path_factory.mktemp("fixtures"))
    return list(load_benchmark("arc-challenge", folders["arc-challenge"]))


@pytest.mark.parametrize("scoring", ["logits", "generate"])
@pytest.mark.parametrize("side", ["former", "latter"])
def test_no_fusion_is_the_receiver_and_full_fusion_is_c2c(items, tiny_receiver, tiny_sharer, scoring, side):
    (r, rt), (s, st) = tiny_receiver, tiny_sharer
    c2c = C2C.from_models(r, rt, s, st, make_fuser(r, s, seed=3, gate_logit=1.0), scoring=scoring, max_new_tokens=6)
    receiver = ReceiverAlone(r, rt, scoring=scoring, max_new_tokens=6)
    answers = {name: method.answer(items, batch_size=4) for name, method in
               [("receiver", receiver), ("c2c", c2c), ("p0", PartialC2C.of(c2c, 0.0, side)),
                ("p100", PartialC2C.of(c2c, 1.0, side)), ("p50", PartialC2C.of(c2c, 0.5, side))]}

    def same(a, b):
        return all((x.letter, x.text, x.scores) == (y.letter, y.text, y.scores) for x, y in zip(a, b))

    assert same(answers["p0"], answers["receiver"])
    assert same(answers["p100"], answers["c2c"])
    assert not same(answers["c2c"], answers["receiver"])  # the fuser really changes the answers
    if scoring == "logits":  # half the prompt fused: scores differ from both ends
        assert not same(answers["p50"], answers["receiver"]) and not same(answers["p50"], answers["c2c"])


def test_partial_records_are_kept_apart(items, tiny_receiver, tiny_sharer, tmp_path):
    """The fraction and side are part of the method's description: the evaluator never mixes their records."""
    (r, rt), (s, st) = tiny_receiver, tiny_sharer
    c2c = C2C.from_models(r, rt, s, st, make_fuser(r, s, seed=3, gate_logit=1.0), scoring="logits")
    half = PartialC2C.of(c2c, 0.5, "former")
    assert half.describe()["fuse_fraction"] == 0.5 and half.describe()["fuse_side"] == "former"
    evaluate(half, items[:3], tmp_path, benchmark="arc-challenge", progress=False)
    with pytest.raises(ValueError, match="fuse_side"):
        evaluate(PartialC2C.of(c2c, 0.5, "latter"), items[:3], tmp_path, benchmark="arc-challenge", progress=False)
