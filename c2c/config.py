"""The profile spec of `make reproduce`: one typed `Profile` per profile, its `Stage`s (one per notebook) with their
parameters, upstreams and config inputs, for the Makefile to run them in order and know when one is stale.

Two files make a profile:

* ``params/<profile>.yaml``: the value of every notebook parameter in this profile (flat: ``erank_limit: 64``).
  Paths under the profile's own output folders are written as templates, ``{runs}/mc_fuser``,
  ``{results}/mc``, ``{figures}``, and derived from the profile's name (``runs/small/mc_fuser``), so a
  profile never names another profile's folders and a copied profile writes into its own.
* ``notebooks/stages.yaml``: the stage graph, the same in every profile: each notebook, the stages whose
  results it reads (``after``; ``all`` = every other stage) and the files it writes (``products``: path
  templates with ``{runs}``, ``{results}``, ``{figures}`` or one of the stage's parameters, ``{main_table_out}``;
  ``{path: ..., if: <parameter>}`` when only written while that parameter is set). A stage re-runs when its
  notebook, its parameters, a config file they name, a ``c2c`` source or an upstream stage changed; ``make
  <product>`` runs the stage that writes it, and a stage that ends without writing every product fails, unless
  it wrote why this profile does not run it (``c2c.paths.record_not_run``).

A notebook's parameters cell names the parameters it takes; each stage gets exactly those (``Stage.params``,
written to ``<params dir>/<notebook>.yaml``, rewritten only when they change, so editing one notebook's
parameter does not make the others stale). A profile key no notebook takes, or a parameter a profile does
not set, is an error naming it (it would otherwise be ignored, or left at the notebook's tiny default).
Every value naming a config file of the repository (``configs/train_small_mc.yaml``, also inside a dict or
list) is an input of its stage.

Overrides have one syntax everywhere, the training CLI's ``--key=value`` (values read as YAML):
``make 10_effective_rank PROFILE=small SET="--erank_limit=8"`` and ``load_profile(path, {"erank_limit": 8})``.

    python -m c2c.config PARAMS.yaml OUT.mk EXECUTED_DIR PARAMS_DIR [--key=value ...]

writes each stage's parameter file, the make rules ``<executed>/<stage>.ipynb: <config files> <upstreams>`` and
``<products>: <executed>/<stage>.ipynb``, and each stage's product list ``PRODUCTS_<stage> := ...``.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from c2c.paths import REPO_ROOT
from c2c.train_config import parse_args

CONFIG_FOLDER = "configs"
STAGES_FILE = "notebooks/stages.yaml"
OUTPUT_FOLDERS = ("runs", "results", "figures")  # the templates {runs}, {results}, {figures}
TEMPLATE = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Stage:
    """One notebook of the pipeline in one profile."""

    name: str  # the notebook's stem, e.g. 03_train_fuser
    params: dict[str, Any]  # its parameters only, templates expanded
    after: tuple[str, ...]  # the stages whose results it reads
    configs: tuple[str, ...]  # the repository config files its parameters name
    products: tuple[str, ...] = ()  # the files it writes in this profile (repository-relative)


@dataclass(frozen=True)
class Profile:
    """A profile's stages, in the order of their names (its output folders, ``{runs}`` etc., are ``expand``'s)."""

    name: str
    stages: dict[str, Stage]

    def downstream(self, name: str) -> set[str]:
        """The stages that read `name`'s results, directly or through others (they re-run after it)."""
        found, todo = set(), [name]
        while todo:
            current = todo.pop()
            for stage in self.stages.values():
                if current in stage.after and stage.name not in found:
                    found.add(stage.name)
                    todo.append(stage.name)
        return found


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


def expand(value, profile: str, where: str):
    """`value` with {runs}, {results} and {figures} replaced by the profile's folders (inside dicts and lists)."""
    if isinstance(value, dict):
        return {k: expand(v, profile, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, profile, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def folder(match: re.Match) -> str:
        if match.group(1) not in OUTPUT_FOLDERS:
            raise ValueError(f"{where}: unknown template {match.group(0)!r} in {value!r}; the templates are "
                             f"{', '.join('{' + f + '}' for f in OUTPUT_FOLDERS)}")
        return f"{match.group(1)}/{profile}"
    return TEMPLATE.sub(folder, value)


STAGE_KEYS = ("after", "products")


def stage_graph(notebooks: list[str], root: Path) -> dict[str, dict]:
    """notebooks/stages.yaml as {stage: {"after": its upstreams, "products": its product entries}}, checked against
    the notebooks there and for cycles."""
    path = root / STAGES_FILE
    graph = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if sorted(graph) != sorted(notebooks):
        raise ValueError(f"{STAGES_FILE} must list every notebook once: missing {sorted(set(notebooks) - set(graph))}, "
                         f"unknown {sorted(set(graph) - set(notebooks))}")
    stages = {}
    for name, entry in graph.items():
        entry = entry or {}
        if not isinstance(entry, dict) or set(entry) - set(STAGE_KEYS):
            raise ValueError(f"{STAGES_FILE}: stage {name} must be a mapping with the keys {STAGE_KEYS}, got {entry!r}")
        after = entry.get("after") or []
        after = [n for n in notebooks if n != name] if after == "all" else list(after)
        unknown = sorted(set(after) - set(notebooks))
        if unknown or name in after:
            raise ValueError(f"{STAGES_FILE}: stage {name} runs after {unknown or name!r}, not another stage; "
                             f"the stages are {notebooks}")
        stages[name] = {"after": tuple(after), "products": list(entry.get("products") or [])}
    checked: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:  # depth-first: a stage met again on its own trail is a cycle
        if name in trail:
            raise ValueError(f"{STAGES_FILE}: the stages form a cycle: {' -> '.join(trail[trail.index(name):] + [name])}")
        if name not in checked:
            for upstream in stages[name]["after"]:
                visit(upstream, trail + [name])
            checked.add(name)
    for name in stages:
        visit(name, [])
    return stages


def stage_products(entries: list, params: dict[str, Any], profile: str, where: str) -> tuple[str, ...]:
    """The files a stage writes in a profile: each product's path with {runs}, {results}, {figures} and the stage's
    own (expanded) parameters filled in; a product ``{path, if: <parameter>}`` only while that parameter is set."""
    paths = []
    for entry in entries:
        entry = entry if isinstance(entry, dict) else {"path": entry}
        if set(entry) - {"path", "if"} or not isinstance(entry.get("path"), str):
            raise ValueError(f"{where}: a product is a path or {{path: <path>, if: <parameter>}}, got {entry!r}")
        condition = entry.get("if")
        if condition is not None and condition not in params:
            raise ValueError(f"{where}: product {entry['path']!r} is written if {condition!r}, which is not a "
                             f"parameter of the stage ({sorted(params)})")
        if condition is not None and not params[condition]:
            continue

        def fill(match: re.Match) -> str:
            name = match.group(1)
            if name in OUTPUT_FOLDERS:
                return f"{name}/{profile}"
            value = params.get(name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{where}: product {entry['path']!r}: {match.group(0)} is neither "
                                 f"{', '.join('{' + f + '}' for f in OUTPUT_FOLDERS)} nor a parameter of the stage "
                                 f"naming a folder (its value: {value!r})")
            return value.rstrip("/")
        paths.append(TEMPLATE.sub(fill, entry["path"]))
    return tuple(paths)


def load_profile(params_path: str | Path, overrides: dict[str, Any] | None = None, *,
                 root: str | Path = REPO_ROOT) -> Profile:
    """The profile of a parameter file (its ``profile:`` key names it), overrides applied, every stage checked."""
    root = Path(root)
    values = yaml.safe_load(Path(params_path).read_text(encoding="utf-8")) or {}
    name = values.get("profile")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{params_path}: needs a 'profile: <name>' key (it names the output folders)")
    notebooks = sorted(root.glob("notebooks/*.ipynb"))
    takes = {nb.stem: notebook_parameters(nb) for nb in notebooks}
    declared = set().union(*takes.values())
    for key in overrides or {}:
        if key not in declared:
            raise ValueError(f"override --{key}: no notebook takes a parameter {key!r}")
    values = {**values, **(overrides or {})}
    unknown, missing = sorted(set(values) - declared - {"profile"}), sorted(declared - set(values))
    if unknown or missing:
        raise ValueError(f"{params_path}: " + "; ".join(
            part for part in (unknown and f"keys no notebook takes (a typo?): {unknown}",
                              missing and f"notebook parameters it does not set (they would keep the notebook's "
                                          f"tiny-profile default): {missing}") if part))
    values = {key: expand(value, name, key) for key, value in values.items()}
    graph = stage_graph(list(takes), root)
    stages = {}
    for stage, keys in sorted(takes.items()):
        params = {key: values[key] for key in keys}
        stages[stage] = Stage(name=stage, params=params, after=graph[stage]["after"],
                              configs=tuple(sorted(set().union(*(config_files(values[key], root) for key in keys)))),
                              products=stage_products(graph[stage]["products"], params, name,
                                                      f"{STAGES_FILE}, stage {stage}"))
    return Profile(name=name, stages=stages)


def write_if_changed(path: Path, text: str) -> bool:
    """Write the file unless it already holds this text (its modification time then stays)."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return True


def write_stages(params_path: str | Path, out: str | Path, executed: str, params_dir: str | Path,
                 overrides: dict[str, Any] | None = None, root: str | Path = REPO_ROOT) -> Profile:
    """Each stage's parameter file and the make rules of its inputs and upstreams (see the module doc)."""
    profile = load_profile(params_path, overrides, root=root)
    for stage in profile.stages.values():
        write_if_changed(Path(params_dir) / f"{stage.name}.yaml",
                         yaml.safe_dump(stage.params, sort_keys=False, allow_unicode=True))
    lines = [f"# written by `python -m c2c.config {params_path}` from it and {STAGES_FILE}: each stage's config "
             "files and the stages it reads, the stage that writes each product, each stage's products"]
    lines += [f"{executed}/{stage.name}.ipynb: " + " ".join([*stage.configs, *(f"{executed}/{a}.ipynb" for a in stage.after)])
              for stage in profile.stages.values() if stage.configs or stage.after]
    lines += [f"{' '.join(stage.products)}: {executed}/{stage.name}.ipynb" for stage in profile.stages.values()
              if stage.products]
    lines += [f"PRODUCTS_{stage.name} := {' '.join(stage.products)}" for stage in profile.stages.values()]
    out = Path(out)
    write_if_changed(out, "\n".join(lines) + "\n")
    out.touch()  # newer than what it was made from, so make does not remake it again
    return profile


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 4 or any(a.startswith("--") for a in args[:4]):
        raise SystemExit("usage: python -m c2c.config PARAMS.yaml OUT.mk EXECUTED_DIR PARAMS_DIR [--key=value ...]")
    config, overrides = parse_args(args[4:])
    if config is not None:
        raise SystemExit("c2c.config: --config is not a notebook parameter (the profile is PARAMS.yaml)")
    write_stages(*args[:4], overrides=overrides, root=Path.cwd())


if __name__ == "__main__":
    main()
