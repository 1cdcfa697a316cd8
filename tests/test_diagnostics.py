"""The fuser diagnostics against values known by construction."""

import json

import pytest
import torch
import yaml

from c2c.align import AlignedPrompt
from c2c.data import ChatExample
from c2c.checkpoint import load_fuser
from c2c.diagnostics import answer_token_losses, dynamic_weights, gain_sources, training_curve
from c2c.diagnostics import main as diagnostics_main
from c2c.fused import C2CModel
from c2c.records import config_items, config_methods, records_path
from conftest import make_fuser

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
                   "sharer_right_on_lost": 0, "receiver_wrong": 3, "sharer_right_on_receiver_wrong": 1,
                   "agrees_with_sharer": 0.6, "agrees_with_receiver": 0.4}


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


def test_answer_token_losses_of_closed_gates_are_the_receivers_own(tiny_receiver):
    model, tokenizer = tiny_receiver
    fuser = make_fuser(model, model, gate_logit=-1.0)  # every gate closed: C2C is the receiver alone
    fused = C2CModel(model, tokenizer, [model], [tokenizer], [fuser])
    g = torch.Generator().manual_seed(0)
    examples = []
    for prompt_length, answer_length in [(7, 3), (11, 1), (5, 4)]:  # different lengths: padded batches
        ids = torch.randint(5, model.config.vocab_size, (prompt_length + answer_length,), generator=g).tolist()
        n = prompt_length
        if answer_length > 1:  # the first answer token is the receiver's own top-1 here, so top-1 counts it
            with torch.no_grad():
                ids[n] = int(model(input_ids=torch.tensor([ids[:n]])).logits[0, -1].argmax())
        examples.append(ChatExample([AlignedPrompt(ids[:n], ids[:n], list(range(n)), [True] * n)], ids[n:]))
    got = answer_token_losses(fused, examples, batch_size=2)
    # reference: the receiver's own forward over each whole sequence, one at a time, in float64 from its logits
    per_position = {}
    top1 = 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.prompt_ids + e.continuation_ids])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # (N, V)
            n = len(e.prompt_ids)
            for p, token in enumerate(e.continuation_ids):
                per_position.setdefault(p, []).append(-float(logprobs[n - 1 + p, token]))
            top1 += int(logprobs[n - 1].argmax()) == e.continuation_ids[0]
    assert got["examples"] == [len(per_position[p]) for p in sorted(per_position)] == [3, 2, 2, 1]
    expected = [sum(v) / len(v) for _, v in sorted(per_position.items())]
    assert got["cross_entropy"] == pytest.approx(expected, abs=1e-4)
    assert top1 == 2 and got["first_token_top1"] == top1 / 3
    with pytest.raises(ValueError, match="no examples"):
        answer_token_losses(fused, [])


def test_the_command_line_report(tmp_path, tiny_receiver, tiny_sharer):
    run = tmp_path / "run"
    fuser = make_fuser(tiny_receiver[0], tiny_sharer[0])
    L = fuser.gate_logit.numel() // 2
    with torch.no_grad():  # K gates of the first two layers open, every V gate closed
        fuser.gate_logit.copy_(torch.tensor([[0.5 if t < 2 else -0.25, -0.75] for t in range(L)]).view_as(fuser.gate_logit))
    fuser.save_pretrained(run / "final")
    (run / "log.jsonl").write_text(json.dumps({"step": 0, "eval_loss": 2.0}) + "\n")
    _write_records(tmp_path / "eval_out", "c2c", [("1", "A"), ("2", "B")])
    _write_records(tmp_path / "eval_out", "receiver", [("1", "B"), ("2", "B")])
    _write_records(tmp_path / "eval_out", "sharer", [("1", "A"), ("2", "A")])
    assert diagnostics_main(["--eval-out", str(tmp_path / "eval_out"), "--fuser", f"c2c={run}"]) == 0
    report = json.loads((tmp_path / "eval_out" / "diagnostics.json").read_text())["c2c"]
    assert report["gates"] == {"layers": L, "key_open": 2, "value_open": 0, "max_abs_logit": 0.75}
    assert report["gain_sources"]["gained"] == 1 and report["gain_sources"]["sharer_right_on_gained"] == 1
    assert report["eval_losses"] == [[0, 2.0]]
    # a copy with every gate open: the gates differ, every other tensor is the run's
    assert diagnostics_main(["--eval-out", str(tmp_path / "eval_out"), "--fuser", f"c2c={run}",
                             "--all-gates-open", str(tmp_path / "open")]) == 0
    opened, saved = load_fuser(tmp_path / "open" / "run"), load_fuser(run / "final")
    assert opened.open_gates().all() and saved.open_gates().sum() == 2
    assert opened.config == saved.config
    for (name, a), (_, b) in zip(opened.state_dict().items(), saved.state_dict().items(), strict=True):
        assert torch.equal(a, b) != (name == "gate_logit"), name
    # with the evaluation's config: the run's fuser on real prompts, mean dynamic weights per layer
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "methods": [{"name": "c2c", "key": "c2c"}]}))
    assert diagnostics_main(["--eval-out", str(tmp_path / "eval_out"), "--fuser", f"c2c={run}", "--eval-config",
                             str(config), "--weight-items", "2"]) == 0
    weights = json.loads((tmp_path / "eval_out" / "diagnostics.json").read_text())["c2c"]["dynamic_weights"]
    rows = weights["layers"]
    assert weights["items"] == 2 and len(rows) == L and all(0 < r["key_alpha"] < 1 for r in rows)
    assert weights["mean_value_scale"] == 0  # every V gate is closed
    assert weights["mean_key_scale"] == pytest.approx(sum(r["key_alpha"] for r in rows[:2]) / L)
    with pytest.raises(SystemExit):
        diagnostics_main(["--eval-out", str(tmp_path), "--fuser", "no-equals-sign"])
