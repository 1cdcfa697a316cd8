"""The fuser diagnostics against values known by construction."""

import json

import pytest
import torch

from c2c.diagnostics import dynamic_weights, gain_sources, training_curve
from c2c.records import config_items, config_methods, records_path

CONFIG = {"name": "t", "receiver": "tiny-receiver", "sharer": "tiny-sharer", "device": "cpu", "scoring": "logits",
          "fuser": {"random": {"seed": 0, "hidden_dim": 16, "intermediate_dim": 16, "gate_logit": 1.0}},
          "methods": [{"name": "c2c", "key": "c"}],
          "benchmarks": [{"name": "arc-challenge", "source": "tiny-fixtures", "limit": 3}]}


def test_dynamic_weights_are_the_sigmoid_of_a_constant_head(tmp_path):
    method = config_methods(CONFIG, ["c"])["c"]
    fuser = method.model.fusers[0]
    G = fuser.gate_logit.numel()
    # a weight head that ignores its input: alpha = sigmoid(bias of its group) at every position and head
    biases = torch.linspace(-2.0, 2.0, G, dtype=torch.float64)
    with torch.no_grad():
        fuser.weight_head.weight.zero_()
        fuser.weight_head.bias.copy_(biases.view(G, 1, 1).expand_as(fuser.weight_head.bias))
        fuser.gate_logit.copy_(torch.tensor([1.0, -1.0] * (G // 2)).view_as(fuser.gate_logit))
    rows = dynamic_weights(method, config_items(CONFIG, "arc-challenge", tmp_path))
    expected = torch.sigmoid(biases.float()).double().view(-1, 2)
    assert len(rows) == G // 2
    for row, (key_alpha, value_alpha) in zip(rows, expected.tolist()):
        assert row["key_alpha"] == pytest.approx(key_alpha, abs=1e-6)
        assert row["value_alpha"] == pytest.approx(value_alpha, abs=1e-6)
        assert row["key_open"] and not row["value_open"]  # K gates +1, V gates -1
        assert row["key_scale"] == row["key_alpha"] and row["value_scale"] == 0
    with pytest.raises(ValueError, match="no items"):
        dynamic_weights(method, [])


def _write_records(out, key, rows):
    path = records_path(out, key, "arc-challenge")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "pred": p, "correct": p == "A"}) + "\n" for i, p in rows))


def test_gain_sources_counts_by_hand(tmp_path):
    # gold is A everywhere; item 4 is missing from the sharer's records, so it is left out
    _write_records(tmp_path, "c2c", [("1", "A"), ("2", "A"), ("3", "B"), ("4", "A"), ("5", "C"), ("6", "A")])
    _write_records(tmp_path, "receiver", [("1", "B"), ("2", "C"), ("3", "A"), ("4", "B"), ("5", "C"), ("6", "A")])
    _write_records(tmp_path, "sharer", [("1", "A"), ("2", "B"), ("3", "B"), ("5", "D"), ("6", "A")])
    got = gain_sources(tmp_path, "arc-challenge")
    assert got == {"benchmark": "arc-challenge", "items": 5, "gained": 2, "lost": 1, "sharer_right_on_gained": 1,
                   "sharer_right_on_lost": 0, "agrees_with_sharer": 0.6, "agrees_with_receiver": 0.4}


def test_training_curve(tmp_path):
    log = [{"step": 0, "eval_loss": 2.0}, {"step": 10, "train_loss": 1.5, "elapsed_s": 5.0},
           {"step": 20, "train_loss": 1.0, "elapsed_s": 9.0}, {"step": 20, "eval_loss": 1.2, "elapsed_s": 9.5}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    curve = training_curve(tmp_path)
    assert curve["train"] == [(10, 1.5), (20, 1.0)] and curve["eval"] == [(0, 2.0), (20, 1.2)]
    assert (curve["first_eval_loss"], curve["last_eval_loss"], curve["min_eval_loss"]) == (2.0, 1.2, 1.2)
    assert curve["elapsed_s"] == 9.5
    with pytest.raises(FileNotFoundError, match="not a c2c.train run folder"):
        training_curve(tmp_path / "missing")
