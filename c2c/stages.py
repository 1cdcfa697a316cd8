"""What each notebook stage of `make reproduce` reads, for the Makefile to know when its result is stale.

A notebook's parameters cell names the parameters it takes; the profile's parameter file gives their values.
Each notebook gets only its own parameters (``<params dir>/<notebook>.yaml``, rewritten only when they
change, so editing one notebook's parameter does not make the others stale). Every value that names a
config file of the repository (``configs/train_small_mc.yaml``, also inside a dict or list) is an input of
that notebook too: editing the config makes its executed copy out of date, and the Makefile's order of
notebooks carries that on to the notebooks that read its results. (That every profile key is some
notebook's parameter, so a typo is not silently ignored, is a test: tests/test_project.py.)

    python -m c2c.stages PARAMS.yaml OUT.mk EXECUTED_DIR PARAMS_DIR

writes the parameter files and one make rule per notebook, ``<executed>/<notebook>.ipynb: <config files>``.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import yaml

from c2c.paths import REPO_ROOT

CONFIG_FOLDER = "configs"


def notebook_parameters(path: str | Path) -> list[str]:
    """The names its ``parameters``-tagged cell assigns (what papermill may set)."""
    cells = json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{path}: needs exactly one cell tagged 'parameters', found {len(tagged)}")
    tree = ast.parse("".join(tagged[0]["source"]))
    return [target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
            if isinstance(target, ast.Name)]


def config_files(value, root: Path) -> set[str]:
    """The repository config files a parameter value names (strings, also inside dicts and lists)."""
    if isinstance(value, dict):
        return set().union(*(config_files(v, root) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(config_files(v, root) for v in value))
    if isinstance(value, str) and value.startswith(f"{CONFIG_FOLDER}/") and (root / value).is_file():
        return {value}
    return set()


def notebook_inputs(params: dict, notebooks: list[Path], root: Path) -> dict[str, list[str]]:
    """notebook name -> the config files its parameters name in this profile."""
    return {nb.stem: sorted(set().union(*(config_files(params[name], root) for name in notebook_parameters(nb)
                                          if name in params)))
            for nb in notebooks}


def write_if_changed(path: Path, text: str) -> bool:
    """Write the file unless it already holds this text (its modification time then stays)."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return True


def write_stages(params_path: str | Path, out: str | Path, executed: str, params_dir: str | Path,
                 root: Path = REPO_ROOT) -> Path:
    """Each notebook's parameter file and the make rules of the config files it reads (see the module doc)."""
    params = yaml.safe_load(Path(params_path).read_text(encoding="utf-8")) or {}
    notebooks = sorted((root / "notebooks").glob("*.ipynb"))
    names = {nb.stem: notebook_parameters(nb) for nb in notebooks}
    for name, keys in names.items():
        mine = {key: params[key] for key in keys if key in params}
        write_if_changed(Path(params_dir) / f"{name}.yaml", yaml.safe_dump(mine, sort_keys=False, allow_unicode=True))
    inputs = notebook_inputs(params, notebooks, root)
    lines = [f"# written by `python -m c2c.stages {params_path}`: the config files each notebook's parameters name"]
    lines += [f"{executed}/{name}.ipynb: {' '.join(files)}" for name, files in inputs.items() if files]
    out = Path(out)
    write_if_changed(out, "\n".join(lines) + "\n")
    out.touch()  # newer than what it was made from, so make does not remake it again
    return out


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4:
        raise SystemExit("usage: python -m c2c.stages PARAMS.yaml OUT.mk EXECUTED_DIR PARAMS_DIR")
    write_stages(*args, root=Path.cwd())


if __name__ == "__main__":
    main()
