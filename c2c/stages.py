"""What each notebook stage of `make reproduce` reads, for the Makefile to know when its result is stale.

A notebook's parameters cell names the parameters it takes; the profile's parameter file gives their values.
Every value that names a config file of the repository (``configs/train_small_mc.yaml``, also inside a dict
or list) is an input of that notebook: editing the config makes its executed copy out of date, and the
Makefile's order of notebooks carries that on to the notebooks that read its results.

    python -m c2c.stages PARAMS.yaml OUT.mk [EXECUTED_DIR]

writes one make rule per notebook, ``<executed>/<notebook>.ipynb: <config files>``.
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


def write_rules(params_path: str | Path, out: str | Path, executed: str, root: Path = REPO_ROOT) -> Path:
    params = yaml.safe_load(Path(params_path).read_text(encoding="utf-8")) or {}
    inputs = notebook_inputs(params, sorted((root / "notebooks").glob("*.ipynb")), root)
    lines = [f"# written by `python -m c2c.stages {params_path}`: the config files each notebook's parameters name"]
    lines += [f"{executed}/{name}.ipynb: {' '.join(files)}" for name, files in inputs.items() if files]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        raise SystemExit("usage: python -m c2c.stages PARAMS.yaml OUT.mk [EXECUTED_DIR]")
    params_path, out = args[:2]
    profile = (yaml.safe_load(Path(params_path).read_text(encoding="utf-8")) or {}).get("profile")
    write_rules(params_path, out, args[2] if len(args) == 3 else f"results/{profile}/notebooks", root=Path.cwd())


if __name__ == "__main__":
    main()
