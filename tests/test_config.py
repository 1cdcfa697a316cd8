"""The profile spec (c2c.config): stages with only their parameters, paths derived from the profile, the stage
graph checked, each stage's products, overrides in the training CLI's syntax, the make rules written from it."""

import json

import pytest

from c2c.config import load_profile, main, write_stages
from c2c.paths import REPO_ROOT


def notebook(folder, name: str, parameters: str) -> None:
    cells = [{"cell_type": "markdown", "metadata": {}, "source": ["# x"]},
             {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": [parameters], "outputs": [],
              "execution_count": None}]
    (folder / "notebooks").mkdir(exist_ok=True)
    (folder / "notebooks" / f"{name}.ipynb").write_text(json.dumps({"cells": cells}))


@pytest.fixture
def repo(tmp_path):
    """Three notebooks: 03 trains (train_config, train_run), 04 reads it (eval_out, batch_size), 99 reads both."""
    notebook(tmp_path, "03_train", "train_config = 'configs/t.yaml'\ntrain_run = None\nbatch_size = 2\n")
    notebook(tmp_path, "04_eval", "eval_out = None\nbatch_size = 2\nruns = {}\n")
    notebook(tmp_path, "99_index", "eval_out = None\n")
    (tmp_path / "notebooks" / "stages.yaml").write_text(
        '03_train: {products: ["{train_run}/final/x.json", "{figures}/curves.png"]}\n'
        '04_eval: {after: [03_train], products: ["{eval_out}/table.md", {path: "{results}/sub.md", if: runs}]}\n'
        "99_index: {after: all}\n")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "t.yaml").write_text("x: 1\n")
    (tmp_path / "params.yaml").write_text(
        'profile: demo\ntrain_config: configs/t.yaml\ntrain_run: "{runs}/fuser"\nbatch_size: 8\n'
        'eval_out: "{results}/mc"\nruns: {a: "{runs}/fuser/final", b: [configs/t.yaml, "{figures}"]}\n')
    return tmp_path


def test_each_stage_gets_only_its_parameters_with_the_profiles_paths(repo):
    profile = load_profile(repo / "params.yaml", root=repo)
    assert profile.name == "demo" and list(profile.stages) == ["03_train", "04_eval", "99_index"]
    train, evaluate, index = profile.stages.values()
    assert train.params == {"train_config": "configs/t.yaml", "train_run": "runs/demo/fuser", "batch_size": 8}
    assert evaluate.params == {"eval_out": "results/demo/mc", "batch_size": 8,
                               "runs": {"a": "runs/demo/fuser/final", "b": ["configs/t.yaml", "figures/demo"]}}
    assert index.params == {"eval_out": "results/demo/mc"}
    assert train.configs == ("configs/t.yaml",) and evaluate.configs == ("configs/t.yaml",) and index.configs == ()
    assert (train.after, evaluate.after, index.after) == ((), ("03_train",), ("03_train", "04_eval"))
    assert train.products == ("runs/demo/fuser/final/x.json", "figures/demo/curves.png")
    assert evaluate.products == ("results/demo/mc/table.md", "results/demo/sub.md") and index.products == ()
    assert profile.downstream("03_train") == {"04_eval", "99_index"} and profile.downstream("99_index") == set()


def test_overrides_replace_a_parameter_and_an_unknown_one_is_refused(repo):
    profile = load_profile(repo / "params.yaml", {"batch_size": 1, "train_run": "{runs}/other"}, root=repo)
    assert profile.stages["04_eval"].params["batch_size"] == 1
    assert profile.stages["03_train"].params["train_run"] == "runs/demo/other"
    with pytest.raises(ValueError, match="override --batch_sise: no notebook takes"):
        load_profile(repo / "params.yaml", {"batch_sise": 1}, root=repo)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p + "batch_sise: 3\n", r"keys no notebook takes \(a typo\?\): \['batch_sise'\]"),
    (lambda p: p.replace("batch_size: 8\n", ""), r"does not set .*: \['batch_size'\]"),
    (lambda p: p.replace('"{runs}/fuser"', '"{run}/fuser"'), r"train_run: unknown template '\{run\}'"),
    (lambda p: p.replace("profile: demo\n", ""), "needs a 'profile: <name>' key"),
])
def test_a_broken_profile_names_its_problem(repo, edit, message):
    path = repo / "params.yaml"
    path.write_text(edit(path.read_text()))
    with pytest.raises(ValueError, match=message):
        load_profile(path, root=repo)


def test_a_product_written_only_if_a_parameter_is_set_is_left_out_where_it_is_not(repo):
    path = repo / "params.yaml"
    path.write_text(path.read_text().replace('runs: {a: "{runs}/fuser/final", b: [configs/t.yaml, "{figures}"]}', "runs: {}"))
    assert load_profile(path, root=repo).stages["04_eval"].products == ("results/demo/mc/table.md",)


@pytest.mark.parametrize("graph, message", [
    ("03_train: {}\n04_eval: {after: [03_train]}\n", r"every notebook once: missing \['99_index'\]"),
    ("03_train: {}\n04_eval: {after: [03_trian]}\n99_index: {after: all}\n", "runs after \\['03_trian'\\], not another stage"),
    ("03_train: {after: [99_index]}\n04_eval: {after: [03_train]}\n99_index: {after: all}\n",
     "cycle: 03_train -> 99_index -> 03_train"),
    ("03_train: [04_eval]\n04_eval: {}\n99_index: {}\n", r"stage 03_train must be a mapping with the keys \('after', 'products'\)"),
    ("03_train: {writes: [x]}\n04_eval: {}\n99_index: {}\n", "stage 03_train must be a mapping"),
    ('03_train: {products: ["{results}/{trian_run}.md"]}\n04_eval: {}\n99_index: {}\n',
     r"stage 03_train: product .*\{trian_run\} is neither \{runs\}, \{results\}, \{figures\} nor a parameter"),
    ('03_train: {products: ["{batch_size}/x.md"]}\n04_eval: {}\n99_index: {}\n', r"naming a folder \(its value: 8\)"),
    ('03_train: {products: [{path: x.md, if: eval_out}]}\n04_eval: {}\n99_index: {}\n',
     r"written if 'eval_out', which is not a parameter of the stage"),
    ('03_train: {products: [{file: x.md}]}\n04_eval: {}\n99_index: {}\n', r"a product is a path or \{path"),
])
def test_a_broken_stage_graph_names_its_problem(repo, graph, message):
    (repo / "notebooks" / "stages.yaml").write_text(graph)
    with pytest.raises(ValueError, match=message):
        load_profile(repo / "params.yaml", root=repo)


def test_the_make_rules_name_each_stages_configs_and_upstreams_and_unchanged_files_keep_their_time(repo, monkeypatch):
    out, params_dir = repo / "build" / "inputs.mk", repo / "build" / "params"
    write_stages(repo / "params.yaml", out, "results/demo/notebooks", params_dir, root=repo)
    rules = out.read_text().splitlines()[1:]
    assert rules == ["results/demo/notebooks/03_train.ipynb: configs/t.yaml",
                     "results/demo/notebooks/04_eval.ipynb: configs/t.yaml results/demo/notebooks/03_train.ipynb",
                     "results/demo/notebooks/99_index.ipynb: results/demo/notebooks/03_train.ipynb "
                     "results/demo/notebooks/04_eval.ipynb",
                     "runs/demo/fuser/final/x.json figures/demo/curves.png: results/demo/notebooks/03_train.ipynb",
                     "results/demo/mc/table.md results/demo/sub.md: results/demo/notebooks/04_eval.ipynb",
                     "PRODUCTS_03_train := runs/demo/fuser/final/x.json figures/demo/curves.png",
                     "PRODUCTS_04_eval := results/demo/mc/table.md results/demo/sub.md",
                     "PRODUCTS_99_index := "]
    assert (params_dir / "99_index.yaml").read_text() == "eval_out: results/demo/mc\n"
    before = {p.name: p.stat().st_mtime_ns for p in params_dir.iterdir()}
    monkeypatch.chdir(repo)  # the CLI reads the notebooks of the current folder (the repository's root)
    main(["params.yaml", str(out), "results/demo/notebooks", str(params_dir), "--batch_size=3"])
    after = {p.name: p.stat().st_mtime_ns for p in params_dir.iterdir()}
    assert after["99_index.yaml"] == before["99_index.yaml"]  # its parameters did not change
    assert "batch_size: 3" in (params_dir / "04_eval.yaml").read_text()
    with pytest.raises(SystemExit, match="usage"):
        main(["params.yaml", str(out), "--batch_size=3"])


def test_in_every_profile_a_new_fuser_makes_its_evaluation_and_analyses_stale_and_nothing_else():
    for profile in ("tiny", "small", "paper"):
        spec = load_profile(REPO_ROOT / "params" / f"{profile}.yaml")
        assert spec.downstream("03_train_fuser") == {
            "00_quickstart", "04_main_table", "07_ablations", "09_recipe_variants", "10_effective_rank", "11_phase_timing",
            "12_answer_overlap", "13_mmlu_subcategories", "14_fused_fraction", "15_training_cost", "16_model_pairs",
            "17_gsm8k_workflow", "99_paper_index"}
        assert spec.downstream("05_latency") == {"99_paper_index"}
