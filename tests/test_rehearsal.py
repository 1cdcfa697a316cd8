"""The rehearsal profile (c2c/rehearsal.py, configs/rehearsal.yaml): the paper profile's parameters and configs,
derived as they are now, run on CPU with tiny stand-ins; `make rehearsal` end to end (the last test)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from c2c import rehearsal
from c2c.align import TokenAligner
from c2c.benchmarks import load_benchmark
from c2c.data import load_conversations, load_tokenized
from c2c.models import load_model

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = ROOT.parent / "shared" / "tokenizers"


def test_every_paper_parameter_and_config_key_is_derived_and_nothing_points_at_the_hub_or_the_gpu():
    paper = yaml.safe_load((ROOT / "params" / "paper.yaml").read_text())
    params, configs = rehearsal.derive()
    assert set(params) == set(paper) and params["profile"] == "rehearsal"
    for name, config in configs.items():
        assert set(yaml.safe_load((ROOT / "configs" / name).read_text())) <= set(config), name
    hub_ids = list(rehearsal.load_overrides()["standins"]) + [rehearsal.OPENHERMES]

    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        return [s for v in value for s in strings(v)] if isinstance(value, list) else [value] * isinstance(value, str)

    found = strings(params) + strings(configs)
    assert not [s for s in found if s in hub_ids or re.match(r"^(results|runs|figures)/paper\b", s)]
    assert params["device"] == "cpu" and not [s for s in found if s.startswith("cuda")]
    # benchmarks the paper reads from the hub are local copies, in notebooks and in the eval config
    assert all(params[key] for key in params if key.endswith("_source"))
    assert all(b["source"] for b in configs["eval_paper.yaml"]["benchmarks"])


def test_the_gpu_paths_are_forced_at_the_papers_caps():
    paper_eval = yaml.safe_load((ROOT / "configs" / "eval_paper.yaml").read_text())
    paper_train = yaml.safe_load((ROOT / "configs" / "train_paper.yaml").read_text())
    params, configs = rehearsal.derive()
    evaluation, training = configs["eval_paper.yaml"], configs["train_paper.yaml"]
    assert params["eval_config"].endswith("eval_paper.yaml") and params["train_config"].endswith("train_paper.yaml")
    assert evaluation["static_cache"] is True and evaluation["dtype"] == paper_eval["dtype"] == "bfloat16"
    assert evaluation["scoring"] == "generate" and evaluation["max_new_tokens"] == paper_eval["max_new_tokens"]
    assert evaluation["sharer_max_new_tokens"] == paper_eval["sharer_max_new_tokens"]
    assert [m if isinstance(m, str) else m["name"] for m in evaluation["methods"]] == \
           [m if isinstance(m, str) else m["name"] for m in paper_eval["methods"]]  # T2T included
    assert all(m.get("batch_size", 0) <= evaluation["batch_size"] for m in evaluation["methods"] if isinstance(m, dict))
    assert training["precision"] == paper_train["precision"] == "bf16" and training["grad_accum"] > 1
    assert rehearsal.load_overrides()["processes"] > 1 and params["dtype"] == "bfloat16"


def test_a_change_to_the_paper_profile_is_rehearsed_and_an_unknown_hub_model_is_refused(tmp_path, monkeypatch):
    paper = yaml.safe_load((ROOT / "params" / "paper.yaml").read_text())
    monkeypatch.setattr(rehearsal, "PAPER_PARAMS", tmp_path / "paper.yaml")
    rehearsal.PAPER_PARAMS.write_text(yaml.safe_dump({**paper, "new_parameter": [1, 2], "oracle_shots": 3,
                                                      "new_benchmark": "arc-challenge", "new_source": None}))
    params, _ = rehearsal.derive()
    assert params["new_parameter"] == [1, 2] and params["oracle_shots"] == 3
    assert params["new_source"].endswith("benchmarks/arc-challenge")
    rehearsal.PAPER_PARAMS.write_text(yaml.safe_dump({**paper, "oracle_model": "Qwen/Qwen3-8B"}))
    with pytest.raises(ValueError, match=r"params.oracle_model names 'Qwen/Qwen3-8B', a hub model or dataset without"):
        rehearsal.derive()


@pytest.mark.parametrize("name, real", [("Qwen/Qwen3-0.6B", "qwen3"), ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5")])
def test_a_stand_in_has_the_real_tokenizer_and_generation_config_and_is_rebuilt_when_damaged(name, real):
    spec = rehearsal.load_overrides()["standins"][name]
    folder = rehearsal.standin_path(name, spec, TOKENIZERS)
    model, tokenizer = load_model(folder)
    original = AutoTokenizer.from_pretrained(TOKENIZERS / real)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which colour? 红色"}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert rendered == original.apply_chat_template(chat, tokenize=False, add_generation_prompt=True,
                                                    enable_thinking=False)
    assert tokenizer.encode(rendered) == original.encode(rendered) and len(tokenizer) == len(original)
    assert model.config.model_type == spec["config"]["model_type"] and model.config.vocab_size == 151936
    assert model.generation_config.do_sample is True and model.generation_config.eos_token_id == [151645, 151643]
    assert json.loads((folder / "config.json").read_text())["dtype"] == spec["dtype"]  # saved as the hub's
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    weights.write_bytes(bytes(data))
    assert rehearsal._tiny_problems(folder)
    assert rehearsal.standin_path(name, spec, TOKENIZERS) == folder and not rehearsal._tiny_problems(folder)


def test_the_pair_of_stand_ins_shares_a_vocabulary_as_the_papers_pair_does():
    standins = rehearsal.load_overrides()["standins"]
    tokenizers = [load_model(rehearsal.standin_path(n, standins[n], TOKENIZERS))[1]
                  for n in ("Qwen/Qwen3-0.6B", "Qwen/Qwen2.5-0.5B-Instruct")]
    assert TokenAligner(*tokenizers).shared_vocabulary


def test_the_local_data_is_in_the_hub_schemas(tmp_path):
    sources = rehearsal.write_data(tmp_path, 15)
    records = json.loads(Path(sources[rehearsal.OPENHERMES]).read_text())
    assert len(records) == 15 and set(records[0]) >= {"conversations", "source", "category", "system_prompt", "hash"}
    assert {turn["from"] for r in records for turn in r["conversations"]} == {"system", "human", "gpt"}
    assert all(set(turn) == {"from", "value", "weight"} for r in records for turn in r["conversations"])
    chats = load_conversations(sources[rehearsal.OPENHERMES])
    assert len(chats) == 15 and max(len(c) for c in chats) == 5  # system + two rounds (the 15th)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "qwen3")
    data = load_tokenized(sources[rehearsal.OPENHERMES], tokenizer, [tokenizer], max_length=2048, progress=False)
    assert data.stats["dropped"]["too_long"] == 1 and len(data) == 14  # the paper's max_length drops the last
    exemplars = load_benchmark("mmlu", sources["mmlu"], split="dev")
    redux = load_benchmark("mmlu-redux", sources["mmlu-redux"])
    assert {i.subject for i in redux} == {i.subject for i in exemplars}
    assert all(sum(e.subject == s for e in exemplars) == 5 for s in {i.subject for i in redux})
    for name in ("arc-challenge", "openbookqa", "ceval"):
        assert load_benchmark(name, sources[name])


def test_make_rehearsal_runs_every_notebook_of_the_paper_profile_on_cpu(tmp_path):
    """The whole rehearsal, from scratch (a few minutes): a GPU-path crash anywhere fails it (the eval config's
    errors per item included, via `c2c.rehearsal check`)."""
    stamp = tmp_path / "stamp"
    stamp.touch()
    done = subprocess.run(["make", "-C", str(ROOT), "rehearsal", f"PY={sys.executable}", f"STAMP={stamp}"],
                          capture_output=True, text=True, timeout=3 * 3600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    executed = sorted(p.stem for p in (ROOT / "results" / "rehearsal" / "notebooks").glob("*.ipynb"))
    assert executed == notebooks
    summary = [line for line in done.stdout.splitlines() if line.startswith("c2c.rehearsal: ")]
    assert any("training: 2 processes" in line for line in summary)
    assert any("static_cache True, dtype bfloat16" in line for line in summary)
    print("\n".join(summary))
