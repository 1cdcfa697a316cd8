"""The project's own promises: one dependency list, README commands that exist and run, CI = make test."""

import importlib.metadata
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import nbformat
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def read_lock(path: Path = ROOT / "requirements.lock") -> dict[str, Version]:
    """requirements.lock as {canonical name: exact version}; every line must be `name==version`."""
    pins = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        requirement = Requirement(line)
        specs = list(requirement.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, f"{lineno}: {line}"
        assert not requirement.marker and not requirement.url and not requirement.extras, f"{lineno}: {line}"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{lineno}: {name} pinned twice"
        pins[name] = Version(specs[0].version)
    return pins


def makefile_torch_spec() -> Requirement:
    return Requirement(re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1))


def test_pyproject_environment_yml_and_the_lock_agree():
    lock = read_lock()
    # torch comes from TORCH_SPEC (CPU or CUDA build), never from the lock, nor do a CUDA build's own wheels
    assert not [n for n in lock if n in ("torch", "triton") or n.startswith(("nvidia-", "cuda-"))]
    torch_spec = makefile_torch_spec()
    assert torch_spec.name == "torch" and [s.operator for s in torch_spec.specifier] == ["=="]
    torch_version = Version(next(iter(torch_spec.specifier)).version)

    dependencies = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    for required in ("torch", "transformers", "datasets", "accelerate", "safetensors", "gguf", "papermill", "nbval",
                     "jupyterlab", "matplotlib", "seaborn", "tqdm", "scikit-learn"):
        assert any(d.name == required for d in dependencies), required
    for dependency in dependencies:
        name = canonicalize_name(dependency.name)
        version = torch_version if name == "torch" else lock.get(name)
        assert version is not None, f"{name} is a dependency in pyproject.toml but not in requirements.lock: make lock"
        assert dependency.specifier.contains(version, prereleases=True), \
            f"requirements.lock has {name}=={version}, outside pyproject.toml's {dependency}: make lock"

    conda = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    assert "python=3.11" in conda  # the lock was resolved for python 3.11
    assert "python 3.11." in (ROOT / "requirements.lock").read_text().splitlines()[0]
    pip_section = next(entry["pip"] for entry in conda if isinstance(entry, dict))
    assert pip_section == [str(torch_spec), "-r requirements.lock", "-e ."]


def test_the_environment_running_the_tests_is_the_locked_one():
    """`make setup` installed exactly the lock (a stale .venv, or a dependency resolved afresh, shows up here)."""
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in importlib.metadata.distributions()}
    wrong = {name: (str(version), str(installed.get(name))) for name, version in read_lock().items()
             if installed.get(name) != version}
    assert not wrong, f"installed versions differ from requirements.lock (locked, installed): {wrong}; run make setup"
    assert installed["torch"].base_version == next(iter(makefile_torch_spec().specifier)).version


def test_setup_installs_torch_then_the_lock_then_the_package_without_resolving():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^\$\(STAMP\): (.*?)\n((?:\t.*\n)+)", makefile, re.M)
    assert "$(LOCK)" in recipe.group(1).split()  # a changed lock re-runs the install
    steps = recipe.group(2)
    order = [steps.index(s) for s in ('"$(TORCH_SPEC)"', "-r $(LOCK)", "--no-deps -e .")]
    assert order == sorted(order)
    assert re.search(r"^LOCK := requirements.lock$", makefile, re.M) and re.search(r"^lock:", makefile, re.M)


def test_no_deprecated_cache_argument_names():
    """transformers 5.24 calls it `cache` (argument and output attribute); `past_key_values` goes in 5.40.
    The keyword use is also an error under pytest (pyproject's filterwarnings); this catches the attribute."""
    offenders = [f"{path.relative_to(ROOT)}:{n}" for folder in ("c2c", "tests", "benchmarks", "notebooks")
                 for path in sorted((ROOT / folder).rglob("*")) if path.suffix in (".py", ".ipynb")
                 and path.name != "test_project.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if "past_key_values" in line or "cache_params" in line]
    assert not offenders, offenders


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make reproduce" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    makefile = (ROOT / "Makefile").read_text()
    for target in ("setup", "test", "reproduce", "models-small", "data-offline", "lab", "clean-results"):
        assert re.search(rf"^{target}:", makefile, re.M), target


def test_readme_quickstart_runs():
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()  # printed the generated answer


def test_every_profile_sets_every_notebook_parameter_and_make_runs_every_notebook(tmp_path):
    """Each profile loads (c2c.config checks that it sets every notebook parameter and no other key) and names its
    configs; every path under an output folder is the profile's own; the Makefile's NOTEBOOKS are the notebooks."""
    from c2c.config import load_profile
    from c2c.rehearsal import derive  # the rehearsal's parameters and configs are derived from the paper profile's

    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    rehearsal_params, rehearsal_configs = derive()
    (tmp_path / "rehearsal.yaml").write_text(yaml.safe_dump(rehearsal_params))
    for profile in ("tiny", "small", "paper", "rehearsal"):
        path = tmp_path / "rehearsal.yaml" if profile == "rehearsal" else ROOT / "params" / f"{profile}.yaml"
        spec = load_profile(path)
        assert spec.name == profile and sorted(spec.stages) == [nb.stem for nb in notebooks]
        params = {key: value for stage in spec.stages.values() for key, value in stage.params.items()}
        for key in ("train_config", "eval_config", "transfer_config", "ablation_config"):
            config = ROOT / params[key]
            assert config.name in rehearsal_configs if profile == "rehearsal" else config.is_file(), (profile, key)
        strings = [v for v in params.values() if isinstance(v, str)]
        strings += [v for d in params.values() if isinstance(d, dict) for v in d.values() if isinstance(v, str)]
        outputs = [p for p in strings if re.match(r"(runs|results|figures)/", p)]
        assert outputs and all(p.split("/")[1] == profile for p in outputs), (profile, outputs)
    makefile = re.search(r"^NOTEBOOKS := (.*?[^\\])$", (ROOT / "Makefile").read_text(), re.M | re.S).group(1)
    assert sorted(makefile.replace("\\", " ").split()) == [path.stem for path in notebooks]

@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_valid_nbformat_with_cell_ids(path):
    """A cell without an id is a warning of nbformat today and an error in its next versions."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nbformat.validate(nbformat.read(path, as_version=4))


# files the README links that no stage writes: a benchmark's output (benchmarks/, never a stage). Nothing else, so
# that a new result the README quotes cannot come from a command `make reproduce` does not run
README_CLI_RESULTS = {
    "results/small/train_throughput.json": "python benchmarks/train_throughput.py --cases small (a benchmark, not a stage)",
}


def test_every_small_profile_file_the_readme_links_is_written_by_a_stage():
    """Each results/small/... or figures/small/... file the README names exists and is a product of a small-profile
    stage (notebooks/stages.yaml), except the few CLI analyses listed above."""
    from c2c.config import load_profile

    products = {path for stage in load_profile(ROOT / "params" / "small.yaml").stages.values() for path in stage.products}
    named = set(re.findall(r"((?:results|figures)/small/[\w./-]*\w\.(?:md|csv|json|png|pdf))", (ROOT / "README.md").read_text()))
    assert named, "the README names no small-profile result"
    for path in sorted(named):
        assert (ROOT / path).is_file(), f"the README links {path}, which does not exist"
        assert path in products or path in README_CLI_RESULTS, (
            f"the README links {path}, which no stage writes: declare it in notebooks/stages.yaml or make it a stage")
    assert set(README_CLI_RESULTS) <= named, "a listed CLI result is no longer linked: drop it from the list"


def test_readme_tables_are_whole():
    """Every row of a README table sits in its table: a row after a line of prose renders as prose (a paragraph
    once landed inside the main table, leaving its last row below it). A table starts after a blank line with a
    header row and a delimiter row, and every column count within it agrees."""
    lines = (ROOT / "README.md").read_text().splitlines()
    fenced = [line.startswith("```") for line in lines]
    inside = [sum(fenced[:i]) % 2 == 1 for i in range(len(lines))]  # within a code block (or its closing fence)
    is_row = [line.startswith("|") and not inside[i] for i, line in enumerate(lines)]
    delimiter = re.compile(r"^\|(\s*:?-+:?\s*\|)+$")
    for i, line in enumerate(lines):
        if not is_row[i] or (i > 0 and is_row[i - 1]):
            continue
        assert i == 0 or not lines[i - 1].strip() or fenced[i - 1], (
            f"README line {i + 1} starts a table right after prose: {line[:80]}")
        assert i + 1 < len(lines) and delimiter.match(lines[i + 1].replace(" ", "")), (
            f"README line {i + 1} starts a table without a delimiter row below it: {line[:80]}")
        end = next((j for j in range(i, len(lines)) if not is_row[j]), len(lines))
        columns = {len(re.split(r"(?<!\\)\|", row.strip().strip("|"))) for row in lines[i:end]}
        assert len(columns) == 1, f"README table at line {i + 1} has rows of {sorted(columns)} columns"
