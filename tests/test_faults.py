"""Bad input and faults: each test backs one row of the README table "Bad input and faults".

The table names these tests; `test_every_row_of_the_readme_table_names_a_test_here` keeps the two in step.
Every test here failed on the code before issue 13 (stale caches reused, no locks, unnamed files, ...).
"""

import inspect
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from c2c import fingerprint
from c2c.benchmarks import MCItem, write_tiny_fixtures
from c2c.checkpoint import load_fuser
from c2c.evaluate import run_eval
from c2c.fuser import random_fuser
from c2c.fused import ContextLengthError
from c2c.locks import FolderInUseError
from c2c.methods import C2C, ReceiverAlone, SharerAlone, TextToText
from c2c.models import load_model, tiny_model_path
from c2c.train import checkpoints, read_log, train
from conftest import make_fuser
from test_train import tiny_run

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- helpers


def eval_config(**overrides) -> dict:
    """Receiver alone (letter logits) on 3 ARC items of the tiny fixtures: a run of about a second."""
    config = {"name": "faults", "receiver": "tiny-receiver", "sharer": "tiny-sharer", "scoring": "logits",
              "methods": ["receiver"], "benchmarks": [{"name": "arc-challenge", "source": "tiny-fixtures", "limit": 3}]}
    config.update(overrides)
    return config


def c2c_config(fuser_folder: Path, **overrides) -> dict:
    return eval_config(methods=["c2c"], fuser={"checkpoint": str(fuser_folder)}, **overrides)


class Killed(Exception):
    pass


def killed_at(stop: int):
    def on_step(step, info):
        if step == stop:
            raise Killed

    return on_step


def changed_source(monkeypatch, module_name: str) -> None:
    """Make `code_version` see an edit of one module (a new statement at its end)."""
    original = inspect.getsource

    def getsource(obj):
        text = original(obj)
        return text + "\nEDITED = True\n" if getattr(obj, "__name__", None) == module_name else text

    monkeypatch.setattr(fingerprint.inspect, "getsource", getsource)


def hold_lock(folder: Path, what: str) -> subprocess.Popen:
    """Another process holding the folder's lock (as a running evaluation or training would)."""
    code = ("import sys, time\nfrom c2c.locks import folder_lock\n"
            "with folder_lock(sys.argv[1], sys.argv[2]):\n    print('locked', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder), what], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def no_model_may_load(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr("c2c.models.load_model", refuse)


def overwrite_weight_bytes(path: Path) -> None:
    """Overwrite the data of a safetensors file with 0xff (NaN as float32), the header intact, size unchanged."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    start = 8 + header
    data[start:] = b"\xff" * (len(data) - start)
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ------------------------------------------------------------------------- 1. caches keyed by content


def test_eval_records_of_a_fuser_retrained_in_place_are_not_reused(tmp_path, tiny_receiver, tiny_sharer):
    fuser_folder = tmp_path / "fuser"
    make_fuser(tiny_receiver[0], tiny_sharer[0], seed=0, gate_logit=1.0).save_pretrained(fuser_folder)
    run_eval(c2c_config(fuser_folder), tmp_path / "out", progress=False)
    make_fuser(tiny_receiver[0], tiny_sharer[0], seed=1, gate_logit=1.0).save_pretrained(fuser_folder)  # retrained
    with pytest.raises(ValueError, match=r"c2c_logits/arc-challenge\.jsonl holds results of a different setup: the "
                                         r"fuser's weights or config changed \(e.g. retrained in place\).*fresh output "
                                         r"folder.*or delete"):
        run_eval(c2c_config(fuser_folder), tmp_path / "out", progress=False)
    fresh = run_eval(c2c_config(fuser_folder), tmp_path / "fresh", progress=False)  # the way out the error names
    assert fresh.results[("c2c_logits", "arc-challenge")].n == 3


def test_eval_records_under_other_prompt_code_are_not_reused(tmp_path, monkeypatch):
    run_eval(eval_config(), tmp_path, progress=False)
    changed_source(monkeypatch, "c2c.benchmarks")
    with pytest.raises(ValueError, match=r"the prompt/scoring code changed \(c2c.benchmarks, c2c.benchmark_files, c2c.methods"):
        run_eval(eval_config(), tmp_path, progress=False)


def test_eval_records_of_other_model_weights_or_dtype_are_not_reused(tmp_path, tiny_receiver):
    model, tokenizer = tiny_receiver
    folder = tmp_path / "model"
    shutil.copytree(model.name_or_path, folder)
    run_eval(eval_config(receiver=str(folder)), tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match=r"the model's config, weights or dtype changed"):
        run_eval(eval_config(receiver=str(folder), dtype="bfloat16"), tmp_path / "out", progress=False)
    other, _ = load_model(folder)
    with torch.no_grad():
        other.model.norm.weight.mul_(1.5)
    other.save_pretrained(folder)  # the same folder, other weights
    with pytest.raises(ValueError, match=r"the model's config, weights or dtype changed \(fingerprints.model was"):
        run_eval(eval_config(receiver=str(folder)), tmp_path / "out", progress=False)


def test_eval_records_of_other_benchmark_data_are_not_reused(tmp_path):
    data = write_tiny_fixtures(tmp_path / "data")["arc-challenge"]
    config = eval_config(benchmarks=[{"name": "arc-challenge", "source": str(data), "limit": 3}])
    run_eval(config, tmp_path / "out", progress=False)
    import pyarrow.parquet as pq

    test_file = data / "ARC-Challenge" / "test-00000-of-00001.parquet"
    table = pq.read_table(test_file)
    records = table.to_pylist()
    records[0]["question"] += " (reworded)"  # same id, same gold: only the content changed
    pq.write_table(table.from_pylist(records, schema=table.schema), test_file)
    with pytest.raises(ValueError, match=r"the benchmark's records changed"):
        run_eval(config, tmp_path / "out", progress=False)


def test_eval_records_without_fingerprints_are_not_reused(tmp_path):
    run_eval(eval_config(), tmp_path, progress=False)
    meta_path = tmp_path / "eval" / "receiver_logits" / "arc-challenge.meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["fingerprints"]  # as written before issue 13
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"recorded without content fingerprints \(by an older version\)"):
        run_eval(eval_config(), tmp_path, progress=False)


def test_a_finished_run_under_other_training_code_is_not_reused(tmp_path, monkeypatch):
    config = tiny_run(tmp_path, max_steps=2, eval_every=0)
    final = train(config)
    assert train(config) == final  # same code, same config: reused
    changed_source(monkeypatch, "c2c.train")
    with pytest.raises(ValueError, match=r"holds a run finished by other training code \(code version \w+, now \w+: "
                                         r"c2c.train, .*Delete .*run to retrain it, or use another output_dir"):
        train(config)


def test_a_checkpoint_of_other_training_code_is_not_resumed(tmp_path, monkeypatch):
    config = tiny_run(tmp_path)
    with pytest.raises(Killed):
        train(config, on_step=killed_at(3))
    changed_source(monkeypatch, "c2c.fused")
    with pytest.raises(ValueError, match=r"checkpoint-000002: it was written by other training code"):
        train(config)


# --------------------------------------------------------------------------- 2. guarded clean targets


def make_in_copy(tmp_path, *args, **env) -> subprocess.CompletedProcess:
    """`make ARGS` in a copy of the Makefile, params/ and the c2c sources (the notebooks' prerequisites); a test adds
    the notebooks and results it needs."""
    for name in ("Makefile", "pyproject.toml", "requirements.lock"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, tmp_path / name)
    if not (tmp_path / "c2c").exists():
        shutil.copytree(ROOT / "c2c", tmp_path / "c2c", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    if not (tmp_path / "params").exists():  # a test may edit the copy
        shutil.copytree(ROOT / "params", tmp_path / "params")
    stamp = tmp_path / "stamp"
    stamp.touch()
    return subprocess.run(["make", "-C", str(tmp_path), *args, f"PY={sys.executable}", f"STAMP={stamp}"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env})


@pytest.mark.parametrize("profile", ["", " ", "foo", "tiny small", "../results"])
def test_clean_results_refuses_an_empty_or_unknown_profile(tmp_path, profile):
    for kept in ("results/tiny/table.md", "results/small/table.md", "figures/tiny/a.png"):
        (tmp_path / kept).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / kept).write_text("x")
    done = make_in_copy(tmp_path, "clean-results", f"PROFILE={profile}")
    assert done.returncode != 0 and "unknown PROFILE" in done.stderr and "use one of paper rehearsal small tiny" in done.stderr
    assert all((tmp_path / kept).exists() for kept in ("results/tiny/table.md", "results/small/table.md",
                                                      "figures/tiny/a.png"))
    assert make_in_copy(tmp_path, "clean-results", "PROFILE=tiny").returncode == 0  # a known one is cleaned
    assert not (tmp_path / "results" / "tiny").exists() and (tmp_path / "results" / "small" / "table.md").exists()


def test_make_redoes_a_notebook_whose_config_or_code_changed_and_the_notebooks_that_read_it(tmp_path):
    """`make -n reproduce`: nothing when every executed notebook is newer than its inputs; after one notebook's
    parameter changes, that notebook (and the index); after a training config that notebook 03's parameters
    name changes, 03 and the notebooks that read its results (not the others); after a c2c source changes,
    every notebook."""
    for folder in ("notebooks", "configs"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    executed = tmp_path / "results" / "small" / "notebooks"
    executed.mkdir(parents=True)

    def make_n() -> subprocess.CompletedProcess:
        return make_in_copy(tmp_path, "-n", "reproduce", "PROFILE=small")

    def executed_now() -> None:  # every notebook ran after every input was written
        for path in [p for p in tmp_path.rglob("*") if p.is_file()]:
            os.utime(path, (time.time() - 1000, time.time() - 1000))
        now = time.time()
        for name in notebooks:
            (executed / f"{name}.ipynb").write_text("{}")
            os.utime(executed / f"{name}.ipynb", (now, now))

    def redone(changed: str | None = None) -> set[str]:
        if changed:
            (tmp_path / changed).touch()
        done = make_n()
        assert done.returncode == 0, done.stderr
        return set(re.findall(r"papermill notebooks/(\w+)\.ipynb", done.stdout))

    assert make_n().returncode == 0  # writes build/small/ (the notebooks' parameters and inputs)
    executed_now()
    assert redone() == set()
    # one notebook's parameter: that notebook (and the index, which reads every notebook's results), no other
    params = tmp_path / "params" / "small.yaml"
    params.write_text(params.read_text().replace("erank_limit: 64", "erank_limit: 32"))
    assert redone() == {"10_effective_rank", "99_paper_index"}
    assert "erank_limit: 32" in (tmp_path / "build" / "small" / "params" / "10_effective_rank.yaml").read_text()
    executed_now()
    # 03 trains the Identical control, 07 its no-gate variant; the notebooks after 03 follow
    assert redone("configs/train_small_mc_identical.yaml") == {
        "03_train_fuser", "04_main_table", "00_quickstart", "07_ablations", "09_recipe_variants", "10_effective_rank",
        "11_phase_timing", "12_answer_overlap", "13_mmlu_subcategories", "14_fused_fraction", "15_training_cost",
        "16_model_pairs", "17_gsm8k_workflow", "99_paper_index"}
    assert redone("c2c/fuser.py") == set(notebooks)


def test_make_set_overrides_the_parameters_of_the_notebooks_that_take_them(tmp_path):
    """SET="--key=value" (the training CLI's override syntax) rewrites the parameter files of the notebooks that take
    the key (which makes them stale, as the test above shows for an edit); an unknown key is refused; without SET
    the profile's value is back."""
    for folder in ("notebooks", "configs"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    params = tmp_path / "build" / "small" / "params"
    assert make_in_copy(tmp_path, "-n", "reproduce", "PROFILE=small").returncode == 0
    assert "erank_limit: 64" in (params / "10_effective_rank.yaml").read_text()
    done = make_in_copy(tmp_path, "-n", "reproduce", "PROFILE=small", "SET=--erank_limit=8 --cost_limit=3")
    assert done.returncode == 0, done.stderr
    assert "erank_limit: 8" in (params / "10_effective_rank.yaml").read_text()
    assert "cost_limit: 3" in (params / "15_training_cost.yaml").read_text()
    done = make_in_copy(tmp_path, "-n", "reproduce", "PROFILE=small", "SET=--erank_limt=8")
    assert done.returncode != 0 and "override --erank_limt: no notebook takes" in done.stderr
    assert make_in_copy(tmp_path, "-n", "reproduce", "PROFILE=small").returncode == 0
    assert "erank_limit: 64" in (params / "10_effective_rank.yaml").read_text()



def files_written_by(paths: list[str]) -> str:
    """Notebook code that writes each of `paths` (relative to the repository; make runs notebooks in notebooks/)."""
    return (f"from pathlib import Path\nfor name in {paths!r}:\n    path = Path('..') / name\n"
            "    path.parent.mkdir(parents=True, exist_ok=True)\n    path.write_text('x')")


def test_a_stage_that_leaves_out_a_declared_product_fails_and_make_of_a_product_runs_its_stage(tmp_path):
    """Notebook 05's body replaced by stand-ins: one that writes one of its three products fails, naming the other two,
    and leaves no executed notebook; one that writes why the profile does not run it passes; `make <product>` runs the
    stage that declares it, and nothing once it is newer than its stage."""
    for folder in ("notebooks", "configs"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    notebook, executed = tmp_path / "notebooks" / "05_latency.ipynb", tmp_path / "results/tiny/notebooks/05_latency.ipynb"
    write_notebook(notebook, files_written_by(["results/tiny/latency.csv"]))
    done = make_in_copy(tmp_path, "05_latency", "PROFILE=tiny")
    assert done.returncode != 0 and not executed.exists()
    assert "05_latency finished without writing its products: results/tiny/latency_ratios.md figures/tiny/latency.png" \
        in done.stdout, done.stdout + done.stderr
    write_notebook(notebook, files_written_by(["results/tiny/not_run/05_latency.txt"]))
    assert make_in_copy(tmp_path, "05_latency", "PROFILE=tiny").returncode == 0 and executed.exists()
    executed.unlink()
    (tmp_path / "results/tiny/not_run/05_latency.txt").unlink()
    write_notebook(notebook, files_written_by(["results/tiny/latency.csv", "results/tiny/latency_ratios.md",
                                               "figures/tiny/latency.png"]))
    done = make_in_copy(tmp_path, "results/tiny/latency_ratios.md", "PROFILE=tiny")
    assert done.returncode == 0 and executed.exists(), done.stdout + done.stderr
    assert "papermill" not in make_in_copy(tmp_path, "-n", "figures/tiny/latency.png", "PROFILE=tiny").stdout

# ----------------------------------------------------------------------------------- 3. folder locks


def test_a_second_evaluation_into_the_same_folder_is_refused_with_the_holders_pid(tmp_path):
    holder = hold_lock(tmp_path, "evaluation")
    try:
        with pytest.raises(FolderInUseError, match=rf"in use by another evaluation \(pid {holder.pid}\).*kill "
                                                   rf"{holder.pid}.*another folder"):
            run_eval(eval_config(), tmp_path, progress=False)
        assert not (tmp_path / "eval").exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    run_eval(eval_config(), tmp_path, progress=False)  # SIGKILL released the lock


def test_a_second_training_into_the_same_output_dir_is_refused_with_the_holders_pid(tmp_path):
    config = tiny_run(tmp_path, max_steps=2, eval_every=0)
    holder = hold_lock(Path(config["output_dir"]), "training run")
    try:
        with pytest.raises(FolderInUseError, match=rf"in use by another training run \(pid {holder.pid}\)"):
            train(config)
        assert not (Path(config["output_dir"]) / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (train(config) / "model.safetensors").is_file()


# -------------------------------------------------------------------------- 4. one context check for all


def long_item(options_words: int = 0, question_words: int = 0) -> MCItem:
    words = " ".join(["word"] * 50)
    return MCItem(id="arc-challenge/long", benchmark="arc-challenge", subject="ARC-Challenge",
                  question="What is it? " + " ".join(["question"] * question_words),
                  options=("a " + " ".join(["option"] * options_words), "b", "c " + words, "d"), answer="A")


@pytest.mark.parametrize("scoring", ["generate", "logits"])
def test_every_method_refuses_a_prompt_longer_than_the_context_before_running_a_model(tiny_receiver, tiny_sharer,
                                                                                      scoring):
    (receiver, r_tok), (sharer, s_tok) = tiny_receiver, tiny_sharer

    def ran(module, args, kwargs):
        raise AssertionError(f"{type(module).__name__} ran on a prompt longer than its context")

    hooks = []

    def forbid(*models):
        hooks.extend(m.register_forward_pre_hook(ran, with_kwargs=True) for m in models)

    fuser = make_fuser(receiver, sharer, gate_logit=1.0)
    methods = {"receiver": ReceiverAlone(receiver, r_tok, scoring=scoring),
               "sharer": SharerAlone(sharer, s_tok, scoring=scoring),
               "t2t": TextToText(receiver, r_tok, sharer, s_tok, scoring=scoring, sharer_max_new_tokens=8),
               "c2c": C2C.from_models(receiver, r_tok, sharer, s_tok, fuser, scoring=scoring)}
    too_long = long_item(question_words=1100)  # > 1024 tokens for both tiny models
    try:
        forbid(receiver, sharer)
        for name, method in methods.items():
            with pytest.raises(ContextLengthError, match=r"prompt of \d+ tokens \+ \d+ new tokens exceeds .*context "
                                                         r"of 1024; shorten the prompt or max_new_tokens"):
                method.answer([too_long])
        for hook in hooks:
            hook.remove()
        hooks.clear()
        forbid(receiver)  # T2T's second stage: the sharer's prompt (options withheld) fits, the receiver's does not
        with pytest.raises(ContextLengthError, match=r"exceeds the receiver \(T2T answer\)'s context of 1024"):
            methods["t2t"].answer([long_item(options_words=1100)])
    finally:
        for hook in hooks:
            hook.remove()


# ------------------------------------------------------------------------ 5. errors that name the file


def test_a_truncated_model_safetensors_is_named_with_the_fix(tmp_path, tiny_receiver):
    folder = tmp_path / "model"
    shutil.copytree(tiny_receiver[0].name_or_path, folder)
    truncate(folder / "model.safetensors")
    with pytest.raises(OSError, match=rf"cannot load the model in {re.escape(str(folder))}: "
                                      rf"{re.escape(str(folder / 'model.safetensors'))} is damaged .*Fix: copy or "
                                      rf"download {re.escape(str(folder))} again"):
        load_model(folder)


def test_a_damaged_tiny_model_in_the_cache_is_rebuilt(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("C2C_CACHE", str(tmp_path))
    folder = tiny_model_path("tiny-sharer")
    good = (folder / "model.safetensors").read_bytes()
    overwrite_weight_bytes(folder / "model.safetensors")  # the header is intact: it would load, as NaN
    with caplog.at_level(logging.WARNING):
        assert tiny_model_path("tiny-sharer") == folder
    assert "is damaged" in caplog.text and "rebuilding it" in caplog.text
    assert (folder / "model.safetensors").read_bytes() == good
    model, _ = load_model("tiny-sharer")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


def test_a_damaged_converted_offline_model_is_converted_again(tmp_path, monkeypatch, caplog):
    """The GGUF download and dequantisation are replaced by the tiny sharer; the conversion code is the real one."""
    from c2c import offline

    monkeypatch.setenv("C2C_CACHE", str(tmp_path))
    name = "smollm2-135m-instruct"
    conversions = []
    monkeypatch.setattr(offline, "fetch_gguf", lambda n: tmp_path / "x.gguf")
    monkeypatch.setattr(offline, "load_gguf_model", lambda n: conversions.append(n) or load_model("tiny-sharer"))
    folder = offline.convert_to_safetensors(name)
    marker = json.loads((folder / offline.HF_MARKER).read_text())
    assert "model.safetensors" in marker["files"] and len(conversions) == 1
    assert offline.convert_to_safetensors(name) == folder and len(conversions) == 1  # verified, kept
    good = (folder / "model.safetensors").read_bytes()
    overwrite_weight_bytes(folder / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        offline.convert_to_safetensors(name)
    assert len(conversions) == 2 and "model.safetensors has changed" in caplog.text and "converting" in caplog.text
    assert (folder / "model.safetensors").read_bytes() == good
    del marker["files"]  # converted before checksums were recorded
    (folder / offline.HF_MARKER).write_text(json.dumps(marker))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        offline.convert_to_safetensors(name)
    assert len(conversions) == 3 and "without recording its files' SHA-256" in caplog.text


def test_a_damaged_fuser_file_is_named(tmp_path, tiny_receiver, tiny_sharer):
    folder = tmp_path / "fuser"
    make_fuser(tiny_receiver[0], tiny_sharer[0]).save_pretrained(folder)
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    truncate(weights)
    with pytest.raises(ValueError, match=rf"cannot read {re.escape(str(weights))} .*re-save or retrain the fuser"):
        load_fuser(folder)
    weights.write_bytes(good)
    overwrite_weight_bytes(weights)
    with pytest.raises(FloatingPointError, match=rf"{re.escape(str(weights))} tensor '.*' holds \d+ NaN/inf"):
        load_fuser(folder)


def test_a_malformed_or_unknown_fuser_config_is_named(tmp_path, tiny_receiver, tiny_sharer):
    folder = tmp_path / "fuser"
    make_fuser(tiny_receiver[0], tiny_sharer[0]).save_pretrained(folder)
    config_path = folder / "fuser_config.json"
    good = json.loads(config_path.read_text())
    config_path.write_text(config_path.read_text()[:-20])
    with pytest.raises(ValueError, match=rf"{re.escape(str(config_path))} is not valid JSON .*re-save the fuser"):
        load_fuser(folder)
    config_path.write_text(json.dumps({**good, "hidden_size": 3}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(config_path))}: unknown keys \['hidden_size'\]"):
        load_fuser(folder)


@pytest.mark.parametrize("mode", ["logits", "generate", "t2t-background"])
def test_nan_logits_raise_naming_the_model(mode, tiny_receiver):
    model, tokenizer = load_model("tiny-receiver")  # a private copy: its weights are spoiled below
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    if mode == "t2t-background":  # the spoiled model writes T2T's background text (as the sharer)
        method = TextToText(*tiny_receiver, model, tokenizer, sharer_max_new_tokens=4, max_new_tokens=4)
    else:
        method = ReceiverAlone(model, tokenizer, scoring=mode, max_new_tokens=4)
    with pytest.raises(FloatingPointError, match=rf"logits of .*{re.escape(model.name_or_path)}.* NaN/inf.*weights "
                                                 r"may be damaged"):
        method.answer([long_item()])


@pytest.mark.parametrize("mode", ["logits", "generate"])
def test_a_nan_fused_cache_raises(mode, tiny_receiver, tiny_sharer):
    (receiver, r_tok), (sharer, s_tok) = tiny_receiver, tiny_sharer
    fuser = make_fuser(receiver, sharer, gate_logit=1.0)
    with torch.no_grad():
        fuser.projection_out.bias.fill_(float("nan"))  # every fused key and value becomes NaN
    method = C2C.from_models(receiver, r_tok, sharer, s_tok, fuser, scoring=mode, max_new_tokens=4)
    with pytest.raises(FloatingPointError, match=r"NaN/inf"):
        method.answer([long_item()])


def test_a_torn_last_line_of_the_training_log_is_dropped_with_a_warning(tmp_path, caplog):
    straight = tiny_run(tmp_path, "straight")
    train(straight)
    config = tiny_run(tmp_path, "torn")
    with pytest.raises(Killed):
        train(config, on_step=killed_at(3))
    log_path = Path(config["output_dir"]) / "log.jsonl"
    with log_path.open("a") as f:
        f.write('{"step": 4, "epoch": 0.5, "lr": 0.0')  # killed mid-write
    with caplog.at_level(logging.WARNING):
        assert read_log(config["output_dir"])[-1]["step"] == 3
        train(config)
    assert "dropping a torn last line" in caplog.text
    timing = ("tokens_per_s", "elapsed_s")  # wall-clock: differs between runs
    strip = lambda log: [{k: v for k, v in r.items() if k not in timing} for r in log]  # noqa: E731
    assert strip(read_log(config["output_dir"])) == strip(read_log(straight["output_dir"]))


def test_resume_falls_back_to_the_last_good_checkpoint_with_a_warning(tmp_path, caplog):
    fuser_options = {"hidden_dim": 16, "intermediate_dim": 16, "dropout": 0.1}
    straight = train(tiny_run(tmp_path, "straight", fuser=fuser_options))
    config = tiny_run(tmp_path, "broken", fuser=fuser_options)
    with pytest.raises(Killed):
        train(config, on_step=killed_at(5))
    latest = checkpoints(config["output_dir"])[-1]
    assert latest.name == "checkpoint-000004"
    (latest / "model.safetensors").unlink()  # the latest checkpoint lost its weights
    with caplog.at_level(logging.WARNING):
        resumed = train(config)
    assert re.search(r"cannot resume from .*checkpoint-000004 \(model.safetensors is missing\); falling back",
                     caplog.text)
    a, b = load_fuser(straight).state_dict(), load_fuser(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed from checkpoint 2: still exact


@pytest.mark.parametrize("key, value, message", [
    ("batch_size", "four", r"config key 'batch_size' must be a positive integer, got 'four'"),
    ("batch_size", 0, r"config key 'batch_size' must be a positive integer, got 0"),
    ("max_new_tokens", 2.5, r"config key 'max_new_tokens' must be a positive integer, got 2.5"),
    ("dtype", "float99", r"config key 'dtype' must be one of \['float32', 'bfloat16', 'float16'\], got 'float99'"),
    ("device", "gpu", r"config key 'device' must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu'"),
    ("alignment", False, r"config key 'alignment' must be one of \['first', 'longest'\] or null, got False"),
    ("alignment", "", r"config key 'alignment' must be one of \['first', 'longest'\] or null, got ''"),
    ("methods", [{"name": "receiver", "batch_size": True}],
     r"config key methods\[receiver\]\.'batch_size' must be a positive integer, got True"),
    ("t2t_protocol", "v3", r"unknown T2T protocol 'v3'; one of \('sentence', 'chat'\)"),
    ("methods", [{"name": "t2t", "t2t_protocol": "turns"}], r"unknown T2T protocol 'turns'"),
])
def test_eval_config_types_are_checked_before_any_model_loads(tmp_path, monkeypatch, key, value, message):
    no_model_may_load(monkeypatch)
    with pytest.raises(ValueError, match=message):
        run_eval(eval_config(**{key: value}), tmp_path, progress=False)


def test_cuda_on_a_machine_without_one_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    no_model_may_load(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"config key 'device' is 'cuda', but torch sees no CUDA device"):
        run_eval(eval_config(device="cuda"), tmp_path, progress=False)


def test_a_missing_or_malformed_fuser_checkpoint_is_refused_before_any_model_loads(tmp_path, monkeypatch,
                                                                                  tiny_receiver, tiny_sharer):
    folder = tmp_path / "fuser"
    make_fuser(tiny_receiver[0], tiny_sharer[0]).save_pretrained(folder)
    (folder / "fuser_config.json").write_text("{not json")
    no_model_may_load(monkeypatch)
    with pytest.raises(ValueError, match=r"fuser_config.json is not valid JSON"):
        run_eval(c2c_config(folder), tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match=r"holds neither fuser_config.json .* nor projector_config.json"):
        run_eval(c2c_config(tmp_path / "nowhere"), tmp_path / "out", progress=False)


def test_a_fuser_trained_with_other_model_names_warns(tmp_path, tiny_receiver, tiny_sharer, caplog):
    folder = tmp_path / "fuser"
    random_fuser(tiny_receiver[0].config, tiny_sharer[0].config, hidden_dim=16, intermediate_dim=16,
                 receiver="some-other-receiver", sharer="tiny-sharer").save_pretrained(folder)
    with caplog.at_level(logging.WARNING):
        run_eval(c2c_config(folder), tmp_path / "out", progress=False)
    assert "the fuser was trained with receiver 'some-other-receiver', this run's receiver is 'tiny-receiver'" \
           in caplog.text
    assert "trained with sharer" not in caplog.text  # its sharer name is this run's


def write_notebook(path: Path, code: str) -> None:
    """Replace the notebook's body with `code`, keeping its parameters cell (the profile sets those parameters)."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    notebook.cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])] + \
                     [nbformat.v4.new_code_cell(code)]
    nbformat.write(notebook, path)


def test_a_single_notebook_target_checks_the_profile_and_leaves_no_partial_notebook(tmp_path):
    done = make_in_copy(tmp_path, "03_train_fuser", "PROFILE=foo")
    assert done.returncode != 0 and "unknown PROFILE='foo'" in done.stderr
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    write_notebook(tmp_path / "notebooks" / "01_oracle_cache_enrichment.ipynb", "raise RuntimeError('boom')")
    if not shutil.which("nvidia-smi"):  # the paper profile's own checks run first (here: no GPU)
        done = make_in_copy(tmp_path, "01_oracle_cache_enrichment", "PROFILE=paper")
        assert done.returncode != 0 and "PROFILE=paper needs a CUDA GPU" in done.stdout
    done = make_in_copy(tmp_path, "01_oracle_cache_enrichment", "PROFILE=tiny")  # a notebook that fails
    assert done.returncode != 0 and "boom" in done.stderr + done.stdout
    executed = tmp_path / "results" / "tiny" / "notebooks"
    assert list(executed.iterdir()) == []  # neither a .partial nor a finished-looking notebook
    products = ["results/tiny/oracle_cache_enrichment.csv", "results/tiny/oracle_cache_enrichment.md",
                "figures/tiny/oracle_cache_enrichment.png"]  # its products (notebooks/stages.yaml)
    write_notebook(tmp_path / "notebooks" / "01_oracle_cache_enrichment.ipynb", files_written_by(products))
    assert make_in_copy(tmp_path, "01_oracle_cache_enrichment", "PROFILE=tiny").returncode == 0
    assert [p.name for p in executed.iterdir()] == ["01_oracle_cache_enrichment.ipynb"]


# -------------------------------------------------------------------------------------- 6. the table


def test_every_row_of_the_readme_table_names_a_test_here():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Bad input and faults", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| What")]
    named = [name for row in rows for name in re.findall(r"`(test_\w+)`", row)]
    here = {name for name in globals() if name.startswith("test_")}
    assert len(rows) >= 20 and all(re.search(r"`test_\w+`", row) for row in rows)
    assert set(named) <= here, sorted(set(named) - here)
    assert here - {"test_every_row_of_the_readme_table_names_a_test_here"} <= set(named), sorted(here - set(named))
