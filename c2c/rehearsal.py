"""The rehearsal profile: the paper profile end to end on a CPU, with tiny stand-ins (issue 12).

    python -m c2c.rehearsal prepare   # derive build/rehearsal/ (params, configs, data) and build the stand-ins
    python -m c2c.rehearsal train     # the paper's training config in several processes (accelerate launch)
    python -m c2c.rehearsal check     # after the notebooks: what ran, and that no evaluated item raised

`make rehearsal` runs all three around `make reproduce PROFILE=rehearsal` (the notebooks, by papermill, with
build/rehearsal/params.yaml). How the rehearsal's parameters and configs are derived from the paper
profile's is said in configs/rehearsal.yaml, the one file it adds (`OVERRIDES`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from c2c.benchmarks import BENCHMARKS, MMLU_SUBJECTS, write_tiny_fixtures
from c2c.data import MMLU_AUXILIARY_TRAIN, synthetic_facts
from c2c.fingerprint import sha256_of_file, write_manifest
from c2c.models import MANIFEST_NAME, _tiny_problems
from c2c.paths import REPO_ROOT, cache_dir

PROFILE = "rehearsal"
OVERRIDES = REPO_ROOT / "configs" / "rehearsal.yaml"
PAPER_PARAMS = REPO_ROOT / "params" / "paper.yaml"
INPUTS = REPO_ROOT / "build" / PROFILE  # what `prepare` derives: params.yaml, configs/, data/
TRAIN_RUN = Path("runs") / PROFILE / "train_fuser"  # where notebook 03 looks for its run (relative to the repo)
STANDIN_VERSION = "1"  # bump when `build_standin` changes, so cached stand-ins are rebuilt
OPENHERMES = "teknium/OpenHermes-2.5"
CONFIG_PATH = re.compile(r"^configs/[\w.+-]+\.yaml$")
PAPER_PATH = re.compile(r"^(results|runs|figures)/paper(?=/|$)")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # "Org/Name": a hub model or dataset id
# folders of this repository that runs write into (absent in a fresh clone): "runs/x" there is a path, not a hub id
OUTPUT_FOLDERS = ("runs", "results", "figures", "build")


def load_overrides(path: Path = OVERRIDES) -> dict:
    overrides = yaml.safe_load(path.read_text())
    unknown = sorted(set(overrides) - {"processes", "tokenizers", "openhermes_records", "standins", "configs", "params"})
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}")
    return overrides


# --------------------------------------------------------------------------- stand-in models


def standin_path(name: str, spec: dict, tokenizers: Path) -> Path:
    """The folder of the stand-in for hub model `name`: built on first use into the cache folder (keyed by its
    spec and tokenizer files), rebuilt when its files no longer match their manifest."""
    tokenizer = tokenizers / spec["tokenizer"]
    if not tokenizer.is_dir():
        raise FileNotFoundError(f"stand-in for {name}: no tokenizer folder {tokenizer} (see configs/rehearsal.yaml "
                                "`tokenizers`)")
    files = {path.name: sha256_of_file(path) for path in _tokenizer_files(tokenizer)}  # no memo files beside them
    key = hashlib.sha256(json.dumps({"version": STANDIN_VERSION, "spec": spec, "tokenizer": files},
                                    sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir() / PROFILE / f"{name.replace('/', '--')}-{key}"
    if folder.is_dir() and not _tiny_problems(folder):
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_standin(name, spec, tokenizer, tmp)
    shutil.rmtree(folder, ignore_errors=True)  # a damaged build
    tmp.replace(folder)
    return folder


def _tokenizer_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def build_standin(name: str, spec: dict, tokenizer: Path, folder: Path) -> Path:
    """Seeded random weights of the stand-in's architecture, saved in its dtype, with the tokenizer files copied
    as they are and the real model's generation config."""
    fields = dict(spec["config"])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(**spec["generation_config"])
    folder.mkdir(parents=True)
    model.to(getattr(torch, spec["dtype"])).save_pretrained(folder)
    for path in _tokenizer_files(tokenizer):
        shutil.copyfile(path, folder / path.name)
    (folder / MANIFEST_NAME).write_text(json.dumps({"files": write_manifest(folder)}, indent=2) + "\n")
    return folder


# --------------------------------------------------------------------------- local data in the hub schemas


def _write_if_changed(path: Path, text: str) -> Path:
    """Keep a file's mtime when its content is the same (the tokenized-data cache keys local files by it, make
    redoes the notebooks that read a newer parameter file)."""
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return path


def openhermes_records(count: int) -> list[dict]:
    """`count` conversations in OpenHermes-2.5's schema (a JSON list of records with every field of the hub's
    file; ShareGPT turns `{from, value, weight}`): invented facts as questions, a system turn on every third,
    two question/answer rounds on every fifth, and the last one longer than the paper's max_length (dropped)."""
    facts = synthetic_facts(count + 1, seed=3)
    records = []
    for i, fact in enumerate(facts[:count]):
        turns = [("system", "You are a helpful assistant.")] if i % 3 == 2 else []
        if i % 5 == 4:
            turns += [("human", facts[i + 1].question), ("gpt", f"{facts[i + 1].name} likes {facts[i + 1].colour}.")]
        question = fact.question if i < count - 1 else " ".join([fact.question] * 400)
        turns += [("human", question), ("gpt", f"{fact.name}'s favourite colour is {fact.colour}.")]
        records.append({"custom_instruction": None, "topic": None, "model_name": None, "model": None,
                        "skip_prompt_formatting": False, "category": "rehearsal", "views": None, "language": None,
                        "id": None, "title": None, "idx": None, "hash": None, "avatarUrl": None, "system_prompt": None,
                        "source": "rehearsal", "conversations": [{"from": role, "value": text, "weight": None}
                                                                 for role, text in turns]})
    return records


def mmlu_dev_records(subject: str) -> list[dict]:
    """Five MMLU dev exemplars of a subject in cais/mmlu's schema (question, subject, choices, answer index)."""
    records = []
    for i in range(5):
        a, b = 3 + i, 4 + 2 * i
        choices = [str(a + b + d) for d in (-1, 0, 1, 2)]
        records.append({"question": f"What is {a} + {b}?", "subject": subject, "choices": choices, "answer": 1})
    return records


def mmlu_auxiliary_records(count: int) -> list[dict]:
    """`count` multiple-choice items in the schema of cais/mmlu's auxiliary_train (fields nested under "train")."""
    records = []
    for i in range(count):
        a, b = 2 + i, 5 + 3 * i
        choices = [str(a + b + d) for d in (-2, -1, 0, 1)]
        records.append({"train": {"question": f"What is {a} + {b}?", "subject": "", "choices": choices, "answer": 2}})
    return records


def _auxiliary_source(folder: Path) -> str:
    """How a config names the local copy of MMLU's auxiliary_train."""
    return f"{MMLU_AUXILIARY_TRAIN}={folder / 'mmlu_auxiliary_train.jsonl'}"


def write_data(folder: Path, openhermes_count: int) -> dict[str, Path | str]:
    """Local copies, in the hub schemas, of every dataset the paper profile reads from the hub: name -> path
    (benchmark names -> their folder, OpenHermes-2.5 -> its JSON file) or, for MMLU's auxiliary_train (the MMLU
    regime's data), the dataset string that names its local copy."""
    sources = write_tiny_fixtures(folder / "benchmarks")
    redux_subjects = sorted(p.name for p in sources["mmlu-redux"].iterdir() if p.is_dir())
    assert set(redux_subjects) <= set(MMLU_SUBJECTS), redux_subjects
    for subject in redux_subjects:
        _write_if_changed(folder / "benchmarks" / "mmlu" / subject / "dev.jsonl",
                          "".join(json.dumps(r) + "\n" for r in mmlu_dev_records(subject)))
    sources["mmlu"] = folder / "benchmarks" / "mmlu"
    sources[OPENHERMES] = _write_if_changed(folder / "openhermes2_5.json",
                                            json.dumps(openhermes_records(openhermes_count), indent=1))
    _write_if_changed(folder / "mmlu_auxiliary_train.jsonl",
                      "".join(json.dumps(r) + "\n" for r in mmlu_auxiliary_records(openhermes_count)))
    sources[MMLU_AUXILIARY_TRAIN] = _auxiliary_source(folder)
    return sources


# --------------------------------------------------------------------------- the derivation


def merged(base: dict, over: dict) -> dict:
    """`over` laid over `base`: mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class Derivation:
    """Maps the paper profile's values to the rehearsal's (configs/rehearsal.yaml, steps 1-3)."""

    def __init__(self, overrides: dict, models: dict[str, str], data: dict[str, str], inputs: Path = INPUTS):
        """models: hub id -> stand-in folder; data: hub dataset id or benchmark name -> local copy."""
        self.overrides, self.models, self.inputs = overrides, models, inputs
        self.datasets = {name: path for name, path in data.items() if name not in BENCHMARKS}
        self.benchmarks = {name: path for name, path in data.items() if name in BENCHMARKS}
        self.configs: dict[str, dict] = {}  # derived config file name -> its content

    def value(self, value, where: str):
        """Every string inside `value` (lists and mappings walked) mapped; dict keys are kept."""
        if isinstance(value, dict):
            return {k: self.value(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, str):
            return value
        if value in self.models:
            return self.models[value]
        if value in self.datasets:
            return self.datasets[value]
        if CONFIG_PATH.match(value):
            return self.config(value)
        if PAPER_PATH.match(value):
            return PAPER_PATH.sub(r"\1/" + PROFILE, value)
        top = value.split("/")[0]
        if HUB_ID.match(value) and top not in OUTPUT_FOLDERS and not (REPO_ROOT / top).exists():
            raise ValueError(f"{where} names {value!r}, a hub model or dataset without a rehearsal stand-in: add one "
                             "to `standins` in configs/rehearsal.yaml (or a local file to c2c.rehearsal.write_data)")
        return value.replace("{repo}", str(REPO_ROOT))

    def source(self, benchmark: str, where: str) -> str:
        if benchmark not in self.benchmarks:
            raise ValueError(f"{where}: no local copy of benchmark {benchmark!r} for the rehearsal; known: "
                             f"{sorted(self.benchmarks)}")
        return self.benchmarks[benchmark]

    def config(self, relative: str) -> str:
        """Derive configs/X.yaml into build/rehearsal/configs/X.yaml (once); its path relative to the repo."""
        name = Path(relative).name
        if name not in self.configs:
            self.configs[name] = {}  # a config naming itself ends here
            raw = merged(yaml.safe_load((REPO_ROOT / relative).read_text()) or {},
                         self.overrides["configs"].get(name, {}))
            config = self.value(raw, name)
            if "benchmarks" in config:  # an evaluation config: hub benchmarks -> local copies, batches capped
                config["benchmarks"] = [self.benchmark_entry(b, name) for b in config["benchmarks"]]
                cap = config.get("batch_size")
                for i, method in enumerate(config.get("methods") or []):
                    if isinstance(method, dict) and cap and method.get("batch_size", 0) > cap:
                        config["methods"][i] = {**method, "batch_size": cap}
            self.configs[name] = config
        return (self.inputs / "configs" / name).relative_to(REPO_ROOT).as_posix()

    def benchmark_entry(self, entry, where: str):
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        if entry.get("source") is None and entry.get("name") in BENCHMARKS:
            entry["source"] = self.source(entry["name"], where)
        return entry

    def params(self, paper: dict) -> dict:
        """The paper parameters with the overrides, mapped; a null `<x>_source` beside `<x>_benchmark` and a
        benchmark entry ({name: ...}) without a source get the benchmark's local copy."""
        params = self.value(merged(paper, self.overrides["params"]), "params")
        for key, value in params.items():
            stem = key.removesuffix("_source")
            if key != stem and value is None and isinstance(params.get(f"{stem}_benchmark"), str):
                params[key] = self.source(params[f"{stem}_benchmark"], f"params.{key}")
            elif isinstance(value, dict) and value.get("name") in BENCHMARKS:
                params[key] = self.benchmark_entry(value, f"params.{key}")
        return params


def derive(overrides: dict | None = None, *, build: bool = False) -> tuple[dict, dict[str, dict]]:
    """(params, {config file name: config}) of the rehearsal. build: build the stand-ins and write the data
    (else the paths are where they would be, for checks that need no models)."""
    overrides = overrides or load_overrides()
    tokenizers = (REPO_ROOT / overrides["tokenizers"]).resolve()
    if build:
        models = {name: str(standin_path(name, spec, tokenizers)) for name, spec in overrides["standins"].items()}
        data = {k: str(v) for k, v in write_data(INPUTS / "data", overrides["openhermes_records"]).items()}
    else:
        models = {name: f"<stand-in of {name}>" for name in overrides["standins"]}
        data = {name: str(INPUTS / "data" / "benchmarks" / name) for name in BENCHMARKS}
        data[OPENHERMES] = str(INPUTS / "data" / "openhermes2_5.json")
        data[MMLU_AUXILIARY_TRAIN] = _auxiliary_source(INPUTS / "data")
    derivation = Derivation(overrides, models, data)
    params = derivation.params(yaml.safe_load(PAPER_PARAMS.read_text()))
    params["profile"] = PROFILE
    return params, derivation.configs


def prepare() -> Path:
    """Write build/rehearsal/params.yaml and configs/ (the stand-ins built, the data written); the params path."""
    params, configs = derive(build=True)
    header = (f"# Generated by `python -m c2c.rehearsal prepare` from {PAPER_PARAMS.relative_to(REPO_ROOT)} and "
              f"{OVERRIDES.relative_to(REPO_ROOT)}: do not edit.\n")
    for name, config in configs.items():
        _write_if_changed(INPUTS / "configs" / name, header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    path = _write_if_changed(INPUTS / "params.yaml", header + yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    print(f"c2c.rehearsal: wrote {path.relative_to(REPO_ROOT)} and {len(configs)} configs in "
          f"{(INPUTS / 'configs').relative_to(REPO_ROOT)}")
    return path


# --------------------------------------------------------------------------- training, the check


def train(processes: int | None = None) -> Path:
    """The rehearsal's training config in `processes` processes (accelerate launch; gloo on a CPU) into the folder
    notebook 03 reads, which then finds the run finished. Returns the final fuser's folder."""
    params = yaml.safe_load((INPUTS / "params.yaml").read_text())
    processes = processes or load_overrides()["processes"]
    # accelerate starts several processes without GPUs only through its torchrun launcher (--multi_gpu; the
    # processes then use gloo on the CPU): a plain --num_processes N on such a machine starts one process
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--dynamo_backend", "no", "-m", "c2c.train", "--config", params["train_config"], "--output_dir", str(TRAIN_RUN),
               "--progress", "false"]
    print("c2c.rehearsal:", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO_ROOT)
    return REPO_ROOT / TRAIN_RUN / "final"


def check(root: Path = REPO_ROOT) -> list[str]:
    """What the rehearsal exercised, read from what it wrote (one line each); raises if a GPU-path promise
    does not hold or an evaluated item raised anywhere (items that raise are otherwise only counted)."""
    results = root / "results" / PROFILE
    params = yaml.safe_load((INPUTS / "params.yaml").read_text())
    problems, lines = [], []

    stats = json.loads((root / TRAIN_RUN / "data_stats.json").read_text())
    train_config = yaml.safe_load((root / TRAIN_RUN / "config.yaml").read_text())
    lines.append(f"training: {stats['processes']} processes x batch {train_config['batch_size']} x grad_accum "
                 f"{train_config['grad_accum']} = {stats['sequences_per_step']} sequences per step, precision "
                 f"{train_config['precision']}, {stats['total_steps']} steps, {stats['dropped']} dropped")
    if stats["processes"] < 2 or train_config["grad_accum"] < 2 or train_config["precision"] != "bf16":
        problems.append("training did not run in several processes with grad_accum > 1 under bf16")

    evaluation = yaml.safe_load((results / "eval_config.yaml").read_text())
    records = {path: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
               for path in sorted(results.rglob("eval/*/*.jsonl"))}
    t2t = [r for path, rs in records.items() if path.parent.name.startswith("t2t") for r in rs]
    new_tokens = [r["extra"].get("new_tokens", 0) for rs in records.values() for r in rs if r.get("extra")]
    lines.append(f"evaluation: static_cache {evaluation['static_cache']}, dtype {evaluation['dtype']}, scoring "
                 f"{evaluation['scoring']}, max_new_tokens {evaluation['max_new_tokens']} (longest answer "
                 f"{max(new_tokens, default=0)}), T2T messages up to {max((r['extra']['sharer_tokens'] for r in t2t), default=0)}"
                 f" of {evaluation['sharer_max_new_tokens']} tokens, {sum(map(len, records.values()))} records in "
                 f"{len(records)} files")
    if evaluation["static_cache"] is not True or evaluation["dtype"] != "bfloat16" or not t2t:
        problems.append("the evaluation did not decode with a static cache in bfloat16, or ran no T2T")
    errors = [f"{path.relative_to(root)}: {r['id']}: {r['error']}" for path, rs in records.items() for r in rs
              if r.get("error")]
    if errors:
        problems.append(f"{len(errors)} evaluated items raised, e.g. " + "; ".join(errors[:3]))
    lines.append(f"notebooks: {len(list((results / 'notebooks').glob('*.ipynb')))} executed with "
                 f"{INPUTS.relative_to(REPO_ROOT) / 'params.yaml'} (device {params['device']}, dtype {params['dtype']})")
    if problems:
        raise RuntimeError("the rehearsal did not hold: " + " | ".join(problems))
    return lines


COMMANDS: dict[str, Callable] = {"prepare": prepare, "train": train, "check": check}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m c2c.rehearsal", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=sorted(COMMANDS))
    result = COMMANDS[parser.parse_args(argv).command]()
    for line in result if isinstance(result, list) else []:
        print("c2c.rehearsal:", line)


if __name__ == "__main__":
    main()
