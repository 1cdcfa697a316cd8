"""Recipe variants (notebook 09): variants parsed with their labels, one evaluation config for all of them with the
paired comparisons, and the every-gate-open copy evaluated beside its original (closed gates: the receiver alone)."""

import pytest
import yaml

from c2c.diagnostics import gate_summary
from c2c.eval_config import load_eval_config
from c2c.records import method_records
from c2c.variants import evaluate_variants, parse_variants, variant_eval_config
from conftest import make_fuser

TINY_TRAIN = "configs/train_tiny.yaml"


def test_variants_are_parsed_with_their_labels(tmp_path):
    variants, labels = parse_variants({
        "c2c": {"config": TINY_TRAIN, "label": "C2C", "output_dir": str(tmp_path / "a")},
        "c2c_fast": {"config": TINY_TRAIN, "learning_rate": 0.1, "output_dir": str(tmp_path / "b")}})
    assert labels == {"c2c": "C2C", "c2c_fast": "c2c_fast"}
    assert variants["c2c_fast"].overrides == {"learning_rate": 0.1, "output_dir": str(tmp_path / "b")}
    assert variants["c2c"].run == tmp_path / "a"
    with pytest.raises(ValueError, match="variant_runs"):
        parse_variants({})
    with pytest.raises(ValueError, match="variant 'c2c'"):
        parse_variants({"c2c": "configs/train_tiny.yaml"})
    with pytest.raises(ValueError, match="unknown config key"):
        parse_variants({"c2c": {"config": TINY_TRAIN, "label": "x", "learning_rat": 1.0}})


def _base(tmp_path):
    base = tmp_path / "eval.yaml"
    base.write_text(yaml.safe_dump({
        "receiver": "tiny-receiver", "sharer": "tiny-sharer", "fuser": {"random": {"seed": 0}}, "scoring": "logits",
        "routing": True, "comparisons": [["c2c", "receiver"]], "methods": ["receiver", "c2c"],
        "benchmarks": [{"name": "arc-challenge", "source": "tiny-fixtures"}]}))
    return base


def _saved(folder, receiver, sharer, gate_logit, names=("tiny-receiver", "tiny-sharer")):
    fuser = make_fuser(receiver, sharer, gate_logit=gate_logit, receiver=names[0], sharer=names[1])
    return fuser.save_pretrained(folder / "final")


def test_one_config_holds_every_variant_and_its_comparisons(tmp_path, tiny_receiver, tiny_sharer):
    finals = {"c2c": _saved(tmp_path / "a", tiny_receiver[0], tiny_sharer[0], -1.0),
              "c2c_b": _saved(tmp_path / "b", tiny_receiver[0], tiny_sharer[0], 1.0)}
    copies = {"c2c": tmp_path / "open" / "a"}
    config = variant_eval_config(_base(tmp_path), finals, {"c2c": "C2C", "c2c_b": "B"}, all_gates_open=copies,
                                 benchmark="arc-challenge", limit=3, name="v")
    assert [(m["key"], m.get("label")) for m in config["methods"]] == [
        ("receiver", None), ("sharer", None), ("c2c", "C2C"), ("c2c_b", "B"),
        ("c2c_all_open", "C2C, every gate open (diagnostic)")]
    assert [m["fuser"]["checkpoint"] for m in config["methods"][2:]] == [str(finals["c2c"]), str(finals["c2c_b"]),
                                                                         str(copies["c2c"])]
    assert config["comparisons"] == [["c2c", "receiver"], ["c2c_b", "receiver"], ["c2c_b", "c2c"],
                                     ["c2c_all_open", "c2c"]]
    assert "routing" not in config and config["benchmarks"] == [{"name": "arc-challenge", "source": "tiny-fixtures",
                                                                  "limit": 3}]
    load_eval_config(config)  # a valid config
    other = _saved(tmp_path / "c", tiny_receiver[0], tiny_sharer[0], 1.0, names=("tiny-receiver", "tiny-other"))
    with pytest.raises(ValueError, match="one receiver and one sharer"):
        variant_eval_config(_base(tmp_path), {**finals, "c2c_c": other}, {"c2c": "C2C", "c2c_b": "B", "c2c_c": "C"},
                            all_gates_open={}, benchmark="arc-challenge", limit=3, name="v")


def test_the_open_copy_of_a_closed_fuser_leaves_the_receiver_alone_no_more(tmp_path, tiny_receiver, tiny_sharer):
    closed = _saved(tmp_path / "closed_run", tiny_receiver[0], tiny_sharer[0], -1.0)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"all_gates_open names \['nope'\]"):
        evaluate_variants({"c2c": closed}, {"c2c": "C2C"}, _base(tmp_path), out, all_gates_open=["nope"],
                          copies=tmp_path / "open", benchmark="arc-challenge", limit=4)
    report = evaluate_variants({"c2c": closed}, {"c2c": "C2C"}, _base(tmp_path), out, all_gates_open=["c2c"],
                               copies=tmp_path / "open", benchmark="arc-challenge", limit=4)
    assert gate_summary(closed)["key_open"] == gate_summary(closed)["value_open"] == 0
    opened = gate_summary(tmp_path / "open" / "closed_run")
    assert opened["key_open"] == opened["value_open"] == opened["layers"] > 0
    scores = {key: [r["scores"] for r in method_records(out, key, "arc-challenge")]
              for key in ("receiver", "c2c", "c2c_all_open")}
    assert len(scores["receiver"]) == 4
    assert scores["c2c"] == scores["receiver"]  # every gate closed: the receiver alone, exactly
    assert scores["c2c_all_open"] != scores["receiver"]  # the copy fuses the sharer into every layer
    assert {key: report.results[(key, "arc-challenge")].n for key in scores} == dict.fromkeys(scores, 4)
    assert (out / "main_table.md").is_file()
