"""The project's own promises: one dependency list, README commands that exist and run, CI = make test."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_and_pyproject_list_the_same_dependencies():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    pip_list = next(entry["pip"] for entry in conda if isinstance(entry, dict))
    assert sorted(pyproject) == sorted(d for d in pip_list if not d.startswith("-e"))
    for required in ("torch", "transformers", "datasets", "accelerate", "safetensors", "gguf", "papermill", "nbval",
                     "jupyterlab", "matplotlib", "seaborn", "tqdm", "scikit-learn"):
        assert any(re.match(rf"{required}\b", dep) for dep in pyproject), required
    assert "transformers>=5.17,<6" in pyproject


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


def test_every_profile_sets_every_notebook_parameter_and_make_runs_every_notebook():
    import ast
    import json

    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    declared = set()
    for path in notebooks:
        cell = next(c for c in json.loads(path.read_text())["cells"] if "parameters" in c["metadata"].get("tags", []))
        tree = ast.parse("".join(cell["source"]))
        declared |= {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets}
    for profile in ("tiny", "small", "paper"):
        params = yaml.safe_load((ROOT / "params" / f"{profile}.yaml").read_text())
        assert declared - set(params) == set(), profile  # a parameter left at the tiny default would be a silent bug
        for key in ("train_config", "eval_config", "transfer_config", "ablation_config"):
            assert (ROOT / params[key]).is_file(), (profile, key)
    makefile = re.search(r"^NOTEBOOKS := (.*?[^\\])$", (ROOT / "Makefile").read_text(), re.M | re.S).group(1)
    assert sorted(makefile.replace("\\", " ").split()) == [path.stem for path in notebooks]
