"""Reading an evaluation's records and rebuilding its methods and items, as run_eval does."""

import pytest
import torch

from c2c.evaluate import run_eval
from c2c.fuse_fraction import PartialC2C
from c2c.methods import C2C, ReceiverAlone, letter_scoring
from c2c.records import config_items, config_methods, correct_by_id, fused_inputs, method_records, same_setup
from conftest import make_fuser

CONFIG = {"name": "t", "receiver": "tiny-receiver", "sharer": "tiny-sharer", "device": "cpu", "scoring": "logits",
          "fuser": {"random": {"seed": 0, "hidden_dim": 16, "intermediate_dim": 16, "gate_logit": 1.0}},
          "methods": [{"name": "receiver", "key": "r"}, {"name": "c2c", "key": "c"}],
          "benchmarks": [{"name": "arc-challenge", "source": "tiny-fixtures", "limit": 4}]}


def test_records_methods_and_items_match_the_evaluation(tmp_path):
    report = run_eval(CONFIG, tmp_path, progress=False)
    records = method_records(tmp_path, "c", "arc-challenge")  # in the order they were run (longest first)
    by_id = lambda rows: sorted(rows, key=lambda r: r["id"])  # noqa: E731
    assert by_id(records) == by_id(report.results[("c", "arc-challenge")].records)
    records = {r["id"]: r for r in records}
    assert correct_by_id(list(records.values())) == {i: r["correct"] for i, r in records.items()}
    items = config_items(CONFIG, "arc-challenge", tmp_path)
    assert sorted(i.id for i in items) == sorted(records)
    assert len(config_items(CONFIG, "arc-challenge", tmp_path, limit=2)) == 2
    methods = config_methods(CONFIG, ["c", "r"])
    assert isinstance(methods["c"], C2C) and isinstance(methods["r"], ReceiverAlone)
    assert methods["c"].model.receiver is methods["r"].model  # one load per model
    # the rebuilt method answers as the evaluation did; a partly fused variant of it at p = 1 too
    for method in (methods["c"], PartialC2C.of(methods["c"], 1.0, "former")):
        assert [(a.letter, a.scores) for a in method.answer(items)] == [(records[i.id]["pred"], records[i.id]["scores"])
                                                                          for i in items]
    # the fused prompts as the method scores them: the letters' log-probabilities at their last token
    inputs = fused_inputs(methods["c"], items)
    letters = letter_scoring(methods["c"].model.receiver_tokenizer).token_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(methods["c"].model(inputs)[:, 0].float(), dim=-1)
    for b, item in enumerate(items):
        expected = records[item.id]["scores"]
        assert {L: float(logprobs[b, letters[L]]) for L in item.letters} == pytest.approx(expected, abs=1e-5)
    assert same_setup(methods["c"], tmp_path, "c", "arc-challenge") and same_setup(methods["r"], tmp_path, "r",
                                                                                   "arc-challenge")
    assert not same_setup(methods["r"], tmp_path, "c", "arc-challenge")  # other models than the records'
    other = tmp_path / "other_fuser"
    make_fuser(methods["c"].model.receiver, methods["c"].model.sharers[0], seed=9).save_pretrained(other)
    swapped = config_methods(CONFIG, ["c"], fuser_checkpoint=other)["c"]
    assert swapped.fuser_name == f"checkpoint:{other}" and not same_setup(swapped, tmp_path, "c", "arc-challenge")
    with pytest.raises(FileNotFoundError, match="Run the evaluation"):
        method_records(tmp_path, "t2t", "arc-challenge")
    with pytest.raises(ValueError, match="not in the eval config"):
        config_methods(CONFIG, ["t2t"])
    with pytest.raises(ValueError, match="not in the eval config"):
        config_items(CONFIG, "mmlu", tmp_path)


def test_prefix_cache_override(tmp_path):
    cached = config_methods({**CONFIG, "prefix_cache": True}, ["r"])["r"]
    plain = config_methods({**CONFIG, "prefix_cache": True}, ["r"], prefix_cache=False)["r"]
    assert hasattr(cached.model, "c2c_prefix_store") and not hasattr(plain.model, "c2c_prefix_store")


@pytest.mark.parametrize("profile", ["tiny", "small", "paper"])
def test_each_profiles_analyses_name_methods_and_benchmarks_of_its_eval_config(profile):
    """Notebooks 10-15 read the evaluation of `analysis_eval_config`: its method keys and benchmarks must exist."""
    import yaml

    from c2c.eval_config import load_eval_config
    from c2c.paths import REPO_ROOT

    params = yaml.safe_load((REPO_ROOT / "params" / f"{profile}.yaml").read_text())
    cfg = load_eval_config(REPO_ROOT / params["analysis_eval_config"])
    keys = {m["key"] for m in cfg["methods"]}
    benchmarks = {b["name"] for b in cfg["benchmarks"]}
    assert set(params["analysis_methods"].values()) <= keys and {"receiver", "sharer", "c2c"} <= set(params["analysis_methods"])
    assert {params[k] for k in ("erank_benchmark", "timing_benchmark", "subcategory_benchmark", "fraction_benchmark",
                                "cost_benchmark")} | set(params["venn_benchmarks"]) <= benchmarks
    assert set(params["cost_checkpoint_runs"]) <= set(params["cost_runs"])
    assert params["subcategory_benchmark"] in ("mmlu", "mmlu-redux")
