"""Recipe variants: fusers trained for one (receiver, sharer) pair with different training settings (learning
rate, gate noise, ...), evaluated side by side in one folder so that every comparison is paired: the receiver
alone, the sharer alone, each variant's C2C and, as a diagnosis, copies of chosen variants with every gate open
(``c2c.diagnostics.open_all_gates``: what the projection does where the trained gates keep it out).

Each variant is a training config with overrides in the training CLI's keys, as ``c2c.pairs`` takes them
(``{"c2c_fixed": {"config": "configs/train_small_mc_fixed.yaml", "label": "..."}}``); the first one is the
reference that the others are compared with. Notebook 09 runs this.
"""

from __future__ import annotations

import os
from pathlib import Path

from c2c.diagnostics import open_all_gates
from c2c.evaluate import run_eval
from c2c.fuser import CONFIG_NAME, FuserConfig
from c2c.main_table import EvalReport
from c2c.pairs import Pair, eval_config_for_pair, parse_pairs
from c2c.paths import repo_relative

ALL_OPEN = "_all_open"  # the method key of a variant's every-gate-open copy: <key>_all_open


def parse_variants(variant_runs: dict) -> tuple[dict[str, Pair], dict[str, str]]:
    """The variants of a profile's ``variant_runs`` (method key -> {"config": file, "label": text, training
    keys...}) as (key -> ``Pair``, key -> label); each training config is loaded and checked."""
    if not isinstance(variant_runs, dict) or not variant_runs:
        raise ValueError(f"variant_runs must map method keys to {{config: <train config>, ...}}, got {variant_runs!r}")
    labels, entries = {}, {}
    for key, entry in variant_runs.items():
        if not isinstance(entry, dict):
            raise ValueError(f"variant {key!r}: give a mapping with 'config' and optional 'label' and training keys")
        entry = dict(entry)
        labels[key] = str(entry.pop("label", key))
        entries[key] = entry
    return dict(zip(entries, parse_pairs(entries))), labels


def variant_eval_config(base: str | os.PathLike, finals: dict[str, Path], labels: dict[str, str], *,
                        all_gates_open: dict[str, Path], benchmark: str, limit: int | None, name: str) -> dict:
    """An evaluation config for the variants: ``base``'s settings and its entry for ``benchmark`` (as
    ``c2c.pairs.eval_config_for_pair``), the receiver and the sharer alone, a C2C method per fuser folder of
    ``finals`` (key -> folder) and per every-gate-open copy of ``all_gates_open`` (key -> folder); each variant
    compared with the receiver and with the first variant, each copy with its variant."""
    models = {key: FuserConfig.from_json_file(Path(folder) / CONFIG_NAME) for key, folder in finals.items()}
    pairs = {(config.receiver, config.sharer) for config in models.values()}
    if len(pairs) != 1:
        raise ValueError(f"the variants must share one receiver and one sharer; their fusers were trained for {sorted(pairs)}")
    config = eval_config_for_pair(base, next(iter(finals.values())), benchmark=benchmark, limit=limit,
                                  methods=("receiver", "sharer"), name=name)
    reference = next(iter(finals))
    for key, folder in finals.items():
        config["methods"].append({"name": "c2c", "key": key, "label": labels[key],
                                  "fuser": {"checkpoint": repo_relative(folder)}})
    for key, folder in all_gates_open.items():
        config["methods"].append({"name": "c2c", "key": key + ALL_OPEN, "label": f"{labels[key]}, every gate open "
                                  "(diagnostic)", "fuser": {"checkpoint": repo_relative(folder)}})
    config["comparisons"] = ([[key, "receiver"] for key in finals] + [[key, reference] for key in finals if key != reference]
                             + [[key + ALL_OPEN, key] for key in all_gates_open])
    return config


def evaluate_variants(finals: dict[str, Path], labels: dict[str, str], base: str | os.PathLike,
                      out: str | os.PathLike, *, all_gates_open: list[str], copies: str | os.PathLike, benchmark: str,
                      limit: int | None) -> EvalReport:
    """Save the every-gate-open copies of the variants ``all_gates_open`` names (``copies``/<run folder name>)
    and evaluate everything into ``out`` (per-item records kept and reused); the evaluation's report."""
    unknown = sorted(set(all_gates_open) - set(finals))
    if unknown:
        raise ValueError(f"all_gates_open names {unknown}, which are not variants ({sorted(finals)})")
    opened = {key: Path(copies) / finals[key].parent.name for key in all_gates_open}
    config = variant_eval_config(base, finals, labels, all_gates_open=opened, benchmark=benchmark, limit=limit,
                                 name="recipe-variants")
    for key, folder in opened.items():
        open_all_gates(finals[key], folder)
    return run_eval(config, out, command="c2c.variants.evaluate_variants: " + ", ".join(finals))
