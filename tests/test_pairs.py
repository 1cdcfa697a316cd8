"""Model pairs (notebook 16: Table 7, Figure 6): pairs parsed and checked, each evaluated with its own fuser's
models, sizes counted without embeddings, and the table's numbers against hand-computed ones."""

import json
import math
import shutil

import pytest
import yaml

from c2c.eval_config import load_eval_config
from c2c.models import load_model
from c2c.pairs import (Pair, c2c_versus, combination_rows, compared_pairs, complex_partners, eval_config_for_pair,
                       eval_config_with_fuser, evaluate_combination, non_embedding_parameters, pair_row, parse_pairs,
                       scored_pairs)
from conftest import make_fuser

TINY_TRAIN = "configs/train_tiny.yaml"


def test_pairs_are_parsed_and_checked(tmp_path):
    pairs = parse_pairs({"a": {"config": TINY_TRAIN, "output_dir": str(tmp_path / "a")},
                         "b": {"config": TINY_TRAIN, "sharer": "tiny-sharer", "max_steps": 3,
                               "output_dir": str(tmp_path / "b")}})
    assert [(p.label, p.slug, p.overrides.get("max_steps")) for p in pairs] == [("a", "a", None), ("b", "b", 3)]
    assert pairs[1].run == tmp_path / "b"
    with pytest.raises(ValueError, match="'config'"):
        parse_pairs({"a": {"output_dir": "x"}})
    with pytest.raises(ValueError, match="pair 'a'.*unknown config key"):
        parse_pairs({"a": {"config": TINY_TRAIN, "learning_rat": 1.0}})
    with pytest.raises(ValueError, match="pair 'a'.*does not exist"):
        parse_pairs({"a": {"config": "configs/no_such.yaml"}})
    with pytest.raises(ValueError, match="same run folder"):
        parse_pairs({"a": {"config": TINY_TRAIN, "output_dir": str(tmp_path / "x")},
                     "b": {"config": TINY_TRAIN, "output_dir": str(tmp_path / "x")}})
    with pytest.raises(ValueError, match="pair_runs"):
        parse_pairs({})


def test_each_benchmark_scores_all_pairs_or_the_ones_it_names(tmp_path):
    pairs = parse_pairs({name: {"config": TINY_TRAIN, "output_dir": str(tmp_path / name)} for name in ("a", "b", "c")})
    plan = scored_pairs(pairs, {"arc-challenge": "all", "mmlu": ["c", "a"]})
    assert [(benchmark, pair.label) for benchmark, pair in plan] == [
        ("arc-challenge", "a"), ("arc-challenge", "b"), ("arc-challenge", "c"), ("mmlu", "c"), ("mmlu", "a")]
    with pytest.raises(ValueError, match=r"'mmlu': no pair is labelled \['d'\]; the pairs are \['a', 'b', 'c'\]"):
        scored_pairs(pairs, {"mmlu": ["a", "d"]})
    for wrong in ("some", []):
        with pytest.raises(ValueError, match="'mmlu': give \"all\" or a list of pair labels"):
            scored_pairs(pairs, {"mmlu": wrong})
    with pytest.raises(ValueError, match="a mapping of benchmarks"):
        scored_pairs(pairs, ["arc-challenge"])


def test_comparisons_name_two_different_known_pairs(tmp_path):
    pairs = parse_pairs({name: {"config": TINY_TRAIN, "output_dir": str(tmp_path / name)} for name in ("a", "b", "c")})
    plan = compared_pairs(pairs, [["c", "a"], ("a", "b")])
    assert [(first.label, second.label) for first, second in plan] == [("c", "a"), ("a", "b")]
    assert compared_pairs(pairs, []) == []
    with pytest.raises(ValueError, match=r"comparison \['a', 'd'\]: no pair is labelled \['d'\]; the pairs are"):
        compared_pairs(pairs, [["a", "d"]])
    for wrong in (["a"], ["a", "b", "c"], ["a", "a"], "ab"):
        with pytest.raises(ValueError, match=r"\[label, other label\] of two different pairs"):
            compared_pairs(pairs, [wrong])


def test_one_fuser_minus_another_is_paired_by_item(tmp_path):
    """A variant minus its control on the items both scored, against a count by hand: the control's records come in
    another order and hold one item the variant lacks, which must not count."""
    variant = [1, 1, 1, 1, 0, 0]
    _write_records(tmp_path / "variant", "c2c", variant)
    control = [1, 0, 0, 0, 0, 1, 1]  # items 0-6, written last to first; item 6 is the control's alone
    _write_records(tmp_path / "control", "c2c", control[::-1], ids=range(6, -1, -1))
    row = c2c_versus(tmp_path / "variant", tmp_path / "control", "mmlu", "minus_control")
    # on items 0-5: variant 4/6, control 2/6; variant alone right on 1, 2, 3, control alone on 5: McNemar 3 vs 1
    assert row["minus_control"] == pytest.approx(100 * 2 / 6, abs=0.01)
    assert row["minus_control_p"] == pytest.approx(2 * (1 + 4) / 2**4)
    assert row["minus_control_low"] < row["minus_control"] < row["minus_control_high"]
    _write_records(tmp_path / "elsewhere", "c2c", [1, 1], ids=[100, 101])
    with pytest.raises(ValueError, match="share no mmlu item"):
        c2c_versus(tmp_path / "variant", tmp_path / "elsewhere", "mmlu", "minus_control")


def _saved_fuser(tmp_path, tiny_receiver, tiny_sharer, **names):
    fuser = make_fuser(tiny_receiver[0], tiny_sharer[0], **names)
    return fuser.save_pretrained(tmp_path / "run" / "final")


def test_a_pair_is_evaluated_with_its_own_fusers_models(tmp_path, tiny_receiver, tiny_sharer):
    folder = _saved_fuser(tmp_path, tiny_receiver, tiny_sharer, receiver="tiny-receiver", sharer="tiny-sharer")
    base = tmp_path / "eval.yaml"
    base.write_text(yaml.safe_dump({
        "receiver": "other-receiver", "sharer": "other-sharer", "fuser": {"random": {"seed": 0}}, "scoring": "logits",
        "routing": True, "comparisons": [["c2c", "receiver"]], "output": "results/elsewhere", "max_new_tokens": 8,
        "methods": ["receiver", "sharer", "c2c"],
        "benchmarks": [{"name": "arc-challenge", "source": "tiny-fixtures", "limit": 9}, "mmlu-redux"]}))
    config = eval_config_for_pair(base, folder, benchmark="arc-challenge", limit=None, methods=("receiver", "c2c"),
                                  name="pair-x")
    assert (config["receiver"], config["sharer"]) == ("tiny-receiver", "tiny-sharer")
    assert config["fuser"] == {"checkpoint": str(folder)}  # outside the repository: absolute
    assert config["benchmarks"] == [{"name": "arc-challenge", "source": "tiny-fixtures", "limit": 9}]
    assert not {"routing", "comparisons", "output"} & set(config) and config["max_new_tokens"] == 8
    checked = load_eval_config(config)
    assert [m["key"] for m in checked["methods"]] == ["receiver", "c2c"]
    limited = eval_config_for_pair(base, folder, benchmark="arc-challenge", limit=2, methods=("t2t",), name="t")
    assert limited["benchmarks"][0]["limit"] == 2
    with pytest.raises(ValueError, match="'ceval' is not in"):
        eval_config_for_pair(base, folder, benchmark="ceval", limit=None, methods=("c2c",), name="x")
    unnamed = _saved_fuser(tmp_path / "unnamed", tiny_receiver, tiny_sharer)
    with pytest.raises(ValueError, match="does not name the receiver and sharer"):
        eval_config_for_pair(base, unnamed, benchmark="arc-challenge", limit=None, methods=("c2c",), name="x")
    # the whole config with the fuser's models (notebook 20): every method, benchmark and setting kept
    whole = eval_config_with_fuser(base, folder)
    assert (whole["receiver"], whole["sharer"], whole["fuser"]) == ("tiny-receiver", "tiny-sharer", {"checkpoint": str(folder)})
    assert whole["methods"] == ["receiver", "sharer", "c2c"] and len(whole["benchmarks"]) == 2 and whole["routing"]
    assert "output" not in whole and whole["comparisons"] == [["c2c", "receiver"]]


@pytest.mark.parametrize("name", ["tiny-receiver", "tiny-sharer"])
def test_sizes_leave_out_the_embeddings(name):
    model, _ = load_model(name)
    unique = {id(p): (n, p.numel()) for n, p in model.named_parameters(remove_duplicate=False)}
    expected = sum(numel for n, numel in unique.values() if "embed_tokens" not in n and "lm_head" not in n)
    assert non_embedding_parameters(name) == expected > 0


def _write_records(out, key, correct, ids=None):
    folder = out / "eval" / key
    folder.mkdir(parents=True)
    lines = [json.dumps({"id": f"q{i}", "correct": c, "pred": "A", "text": "", "parse_failure": False, "seconds": 0.1})
             for i, c in zip(ids or range(len(correct)), correct)]
    (folder / "mmlu.jsonl").write_text("\n".join(lines) + "\n")


def test_a_row_of_the_table_is_computed_from_the_records(tmp_path, tiny_receiver, tiny_sharer):
    _saved_fuser(tmp_path, tiny_receiver, tiny_sharer, receiver="tiny-receiver", sharer="tiny-sharer")
    pair = Pair("tiny pair", TINY_TRAIN, {"output_dir": str(tmp_path / "run")})
    out = tmp_path / "out"
    receiver = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    (tmp_path / "run" / "data_stats.json").write_text(json.dumps({"train_examples": 99, "total_steps": 7}))
    c2c = [1, 1, 0, 1, 1, 1, 1, 0, 0, 0]  # vs the receiver: 4 items only C2C gets, 1 only the receiver
    _write_records(out, "receiver", receiver)
    _write_records(out, "sharer", [1] * 8 + [0, 0])
    _write_records(out, "c2c", c2c)
    _write_records(out / "t2t_subset", "t2t", [0, 1, 1, 1])  # the first 4 items only
    row = pair_row(pair, out, out / "t2t_subset", benchmark="mmlu")
    assert (row["receiver"], row["sharer"], row["c2c"], row["n"]) == (30.0, 80.0, 60.0, 10)
    # Wilson's 95% interval of 6/10, by its closed form
    z, phat = 1.959964, 0.6
    centre, half = (phat + z * z / 20) / (1 + z * z / 10), z * math.sqrt(phat * 0.4 / 10 + z * z / 400) / (1 + z * z / 10)
    assert (row["c2c_ci95_low"], row["c2c_ci95_high"]) == pytest.approx((100 * (centre - half), 100 * (centre + half)), abs=0.01)
    assert (row["receiver_model"], row["sharer_model"]) == ("tiny-receiver", "tiny-sharer")
    assert row["sharer_size"] == non_embedding_parameters("tiny-sharer")
    assert row["c2c_gain"] == 30.0 and row["c2c_gain_p"] == pytest.approx(2 * (1 + 5) / 2**5)  # exact McNemar, 4 vs 1
    assert row["c2c_gain_low"] < 30.0 < row["c2c_gain_high"]
    assert row["c2c_pgr"] == 60.0 and row["sharer_mlp_layers"] == 0  # (60 - 30) / (80 - 30): default C2C
    assert row["train_steps"] == 7
    # on the first 4 items: T2T 3/4, receiver 3/4 (1 each way), C2C 3/4 (vs T2T: 1 each way)
    assert (row["t2t"], row["t2t_n"], row["t2t_gain"], row["t2t_gain_p"]) == (75.0, 4, 0.0, 1.0)
    assert (row["c2c_minus_t2t"], row["c2c_minus_t2t_p"]) == (0.0, 1.0)
    assert "t2t" not in pair_row(pair, out, None, benchmark="mmlu")
    # records under other keys (an eval config whose methods carry none: <name>_<scoring>) give the same row
    for method in ("receiver", "sharer", "c2c"):
        shutil.copytree(out / "eval" / method, out / "eval" / f"{method}_logits")
    shutil.copytree(out / "t2t_subset" / "eval" / "t2t", out / "t2t_subset" / "eval" / "t2t_logits")
    keys = {method: f"{method}_logits" for method in ("receiver", "sharer", "c2c", "t2t")}
    assert pair_row(pair, out, out / "t2t_subset", benchmark="mmlu", keys=keys) == row
    shutil.rmtree(out / "eval" / "c2c")
    assert pair_row(pair, out, None, benchmark="mmlu", keys={"c2c": "c2c_logits"})["c2c"] == 60.0
    # a sharer below the receiver leaves no gap to recover: no PGR (the ratio would be -300%)
    shutil.rmtree(out / "eval" / "sharer")
    _write_records(out, "sharer", [1, 1] + [0] * 8)
    assert pair_row(pair, out, None, benchmark="mmlu", keys={"c2c": "c2c_logits"})["c2c_pgr"] is None
    (tmp_path / "run" / "data_stats.json").unlink()
    with pytest.raises(FileNotFoundError, match="data_stats.json does not exist"):
        pair_row(pair, out, None, benchmark="mmlu", keys={"c2c": "c2c_logits"})


def test_each_complex_fuser_is_compared_with_the_default_fuser_of_its_models_and_budget():
    def row(pair, sharer, layers, steps):
        return {"pair": pair, "receiver_model": "r", "sharer_model": sharer, "sharer_mlp_layers": layers,
                "train_steps": steps}

    rows = [row("C2C", "s", 0, 246), row("other sharer", "t", 0, 492), row("C2C, 4 epochs", "s", 0, 492),
            row("C2C-C", "s", 3, 246), row("C2C-C, 4 epochs", "s", 3, 492), row("C2C-C, 300 steps", "s", 3, 300)]
    found = [(default["pair"], complex_row["pair"]) for default, complex_row in complex_partners(rows)]
    assert found == [("C2C", "C2C-C"), ("C2C, 4 epochs", "C2C-C, 4 epochs"), ("C2C", "C2C-C, 300 steps")]
    assert complex_partners(rows[:3]) == []
    with pytest.raises(ValueError, match="C2C-C, 4 epochs: no pair with the same models and the default fuser"):
        complex_partners([row("other sharer", "t", 0, 492), row("C2C-C, 4 epochs", "s", 3, 492)])


def test_a_combination_needs_two_pairs_with_one_receiver(tmp_path, tiny_receiver, tiny_sharer):
    first = _saved_fuser(tmp_path / "a", tiny_receiver, tiny_sharer, receiver="tiny-receiver", sharer="tiny-sharer")
    other = _saved_fuser(tmp_path / "b", tiny_sharer, tiny_receiver, receiver="tiny-sharer", sharer="tiny-receiver")
    pairs = [Pair("a", TINY_TRAIN, {"output_dir": str(tmp_path / "a" / "run")}),
             Pair("b", TINY_TRAIN, {"output_dir": str(tmp_path / "b" / "run")})]
    with pytest.raises(ValueError, match="one receiver"):
        evaluate_combination(pairs, [first, other], "configs/eval_tiny.yaml", tmp_path / "out",
                             benchmark="arc-challenge", limit=2)
    with pytest.raises(ValueError, match="two or more pairs"):
        evaluate_combination(pairs[:1], [first], "configs/eval_tiny.yaml", tmp_path / "out",
                             benchmark="arc-challenge", limit=2)
    assert not (tmp_path / "out").exists()  # refused before any model loads or folder is made


def test_combination_rows_refuse_records_of_other_items(tmp_path, tiny_receiver, tiny_sharer):
    pairs = [Pair("a", TINY_TRAIN, {"output_dir": str(tmp_path / "a")}), Pair("b", TINY_TRAIN, {"output_dir": str(tmp_path / "b")})]
    for name, n in (("a", 4), ("b", 3)):  # pair b was evaluated on fewer items
        for key in ("sharer", "c2c"):
            _write_records(tmp_path / name, key, [1] * n)
    _write_records(tmp_path / "both", "receiver", [0, 0, 0, 1])
    _write_records(tmp_path / "both", "c2c", [1, 1, 0, 1])
    with pytest.raises(ValueError, match="records of 3 of the combination's 4 items"):
        combination_rows(pairs, [tmp_path / "a", tmp_path / "b"], tmp_path / "both", benchmark="mmlu")
    rows = combination_rows(pairs[:1] * 2, [tmp_path / "a"] * 2, tmp_path / "both", benchmark="mmlu")
    assert [r["row"] for r in rows] == ["receiver alone", "sharer alone: a", "sharer alone: a", "C2C: a", "C2C: a",
                                        "C2C, all fusers at once"]
    assert rows[-1]["accuracy"] == 75.0 and rows[-1]["c2c_gain"] == 50.0 and "c2c_gain" not in rows[0]
    assert rows[-1]["accuracy_ci95_low"] < 75.0 < rows[-1]["accuracy_ci95_high"] <= 100.0
