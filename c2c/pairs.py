"""Model pairs: the paper's Table 7 (other families, swapped roles), Figure 6 (gain against sharer size) and
Table 13 (one receiver, several sharers' fusers at once).

Each pair is a training config (``c2c.train``, with optional overrides in the CLI's keys); its fuser is
trained (or resumed, or found finished) and evaluated the way the main table is: receiver alone, sharer
alone and C2C on one benchmark, T2T on the first items of it (T2T is slow: the sharer writes). The
receiver and sharer of an evaluation are the ones the fuser was trained for (its ``fuser_config.json``),
so a pair cannot be evaluated with models other than its own. ``pair_row`` turns one pair's records into
a row of the table, with 95% intervals and paired exact McNemar tests against the receiver alone;
``evaluate_combination`` and ``combination_rows`` do the same for several pairs' fusers fused in together.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from c2c.evaluate import run_eval
from c2c.fuser import CONFIG_NAME, FuserConfig
from c2c.models import resolve_model_source
from c2c.paths import repo_path, repo_relative
from c2c.records import method_records
from c2c.stats import paired_by_id, pgr, wilson_interval
from c2c.train import train
from c2c.train_config import load_train_config

# the methods of a pair's evaluation (keys as in the main table) and of its T2T subset
PAIR_METHODS = ("receiver", "sharer", "c2c")
T2T_METHODS = ("t2t",)


@dataclass(frozen=True)
class Pair:
    """One (receiver, sharer) pair: its label, training config and overrides of that config."""

    label: str
    config: str  # a training config, relative to the repository
    overrides: dict = field(default_factory=dict)  # training config keys ("max_steps", "fuser.hidden_dim", ...)
    run: Path = field(init=False)  # the training run's folder (the config's output_dir, or the override's)

    def __post_init__(self):
        # loading the config checks it once: a missing file or an unknown key raises here
        object.__setattr__(self, "run", repo_path(load_train_config(repo_path(self.config), self.overrides).output_dir))

    @property
    def slug(self) -> str:
        return self.run.name


def parse_pairs(pair_runs: dict) -> list[Pair]:
    """The pairs of a profile's ``pair_runs`` (label -> {"config": file, other training keys...}), each checked
    by loading its training config (a missing file or an unknown key raises, naming the pair)."""
    if not isinstance(pair_runs, dict) or not pair_runs:
        raise ValueError(f"pair_runs must map labels to {{config: <train config>, ...}}, got {pair_runs!r}")
    pairs = []
    for label, entry in pair_runs.items():
        if not isinstance(entry, dict) or "config" not in entry:
            raise ValueError(f"pair {label!r}: give a mapping with 'config' (a training config) and optional "
                             f"training keys, got {entry!r}")
        overrides = {k: v for k, v in entry.items() if k != "config"}
        try:
            pairs.append(Pair(str(label), str(entry["config"]), overrides))
        except (OSError, ValueError) as error:
            raise ValueError(f"pair {label!r}: {error}") from None
    slugs = [p.slug for p in pairs]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"two pairs train into the same run folder: {slugs}; give each its own output_dir")
    return pairs


def scored_pairs(pairs: list[Pair], benchmarks: dict) -> list[tuple[str, Pair]]:
    """The evaluations a profile asks for, as (benchmark, pair) in its order: ``benchmarks`` maps each benchmark to
    "all" (every pair) or a list of pair labels (e.g. Table 8's variants all on ARC, one of them also on MMLU)."""
    if not isinstance(benchmarks, dict) or not benchmarks:
        raise ValueError(f"give a mapping of benchmarks to \"all\" or a list of pair labels, got {benchmarks!r}")
    by_label = {pair.label: pair for pair in pairs}
    plan = []
    for benchmark, labels in benchmarks.items():
        if labels == "all":
            labels = list(by_label)
        if not isinstance(labels, list) or not labels:
            raise ValueError(f"benchmark {benchmark!r}: give \"all\" or a list of pair labels, got {labels!r}")
        plan += [(benchmark, pair) for pair in _labelled(by_label, labels, f"benchmark {benchmark!r}")]
    return plan


def compared_pairs(pairs: list[Pair], comparisons: list) -> list[tuple[Pair, Pair]]:
    """The comparisons a profile asks for, ``[[label, other label], ...]`` (the first minus the second, e.g. Table 8's
    + fusion minus projection, or a fuser minus its Identical control), as pairs of ``Pair`` in their order."""
    by_label = {pair.label: pair for pair in pairs}
    plan = []
    for comparison in comparisons:
        if not isinstance(comparison, (list, tuple)) or len(comparison) != 2 or comparison[0] == comparison[1]:
            raise ValueError(f"give each comparison as [label, other label] of two different pairs, got {comparison!r}")
        first, second = _labelled(by_label, comparison, f"comparison {list(comparison)}")
        plan.append((first, second))
    return plan


def _labelled(by_label: dict[str, Pair], labels, where: str) -> list[Pair]:
    """The pairs of ``labels``, or an error naming ``where`` they were asked for and the labels there are."""
    unknown = [label for label in labels if label not in by_label]
    if unknown:
        raise ValueError(f"{where}: no pair is labelled {unknown}; the pairs are {list(by_label)}")
    return [by_label[label] for label in labels]


def c2c_versus(out: str | os.PathLike, other_out: str | os.PathLike, benchmark: str, column: str) -> dict:
    """C2C of one pair's evaluation minus C2C of another's on the items both scored (paired by item id), as columns
    ``column`` (points), ``column``_low/_high (its 95% interval) and ``column``_p (exact McNemar): e.g. a fuser
    against its Identical control (the receiver as its own sharer), which separates what the sharer adds from what
    training alone adds."""
    comparison = paired_by_id(method_records(out, "c2c", benchmark), method_records(other_out, "c2c", benchmark))
    if comparison is None:
        raise ValueError(f"{out} and {other_out} share no {benchmark} item: score both on the same items")
    return _difference(column, comparison)


def train_pair(pair: Pair) -> Path:
    """Train the pair's fuser (resuming, or finding the finished run); its final folder."""
    return train(repo_path(pair.config), overrides={**pair.overrides, "output_dir": str(pair.run)})


def eval_config_for_pair(base: str | os.PathLike, fuser_folder: str | os.PathLike, *, benchmark: str,
                         limit: int | None, methods: tuple[str, ...], name: str) -> dict:
    """An evaluation config for one pair: the base config's settings (scoring, dtype, batch size, prompt caches,
    T2T protocol and caps) and its entry for ``benchmark`` (source, split, limit unless ``limit`` is given), with
    the receiver, sharer and fuser of ``fuser_folder`` and only ``methods`` (named as their keys)."""
    raw = eval_config_with_fuser(base, fuser_folder)
    entries = [b if isinstance(b, dict) else {"name": b} for b in raw.get("benchmarks") or []]
    entry = next((b for b in entries if b["name"] == benchmark), None)
    if entry is None:
        raise ValueError(f"benchmark {benchmark!r} is not in {base}; it has {[b['name'] for b in entries]}")
    for key in ("routing", "comparisons"):  # the base's methods are not the pair's
        raw.pop(key, None)
    return {**raw, "name": name, "methods": [{"name": m, "key": m} for m in methods],
            "benchmarks": [{**entry, **({"limit": limit} if limit else {})}]}


def eval_config_with_fuser(base: str | os.PathLike, fuser_folder: str | os.PathLike) -> dict:
    """The evaluation config ``base`` (its settings, methods and benchmarks) with the receiver, sharer and fuser of
    ``fuser_folder``: the models the fuser was trained for, its token alignment, no output folder of its own."""
    raw = yaml.safe_load(repo_path(base).read_text(encoding="utf-8")) or {}
    fuser = FuserConfig.from_json_file(Path(fuser_folder) / CONFIG_NAME)
    if not (fuser.receiver and fuser.sharer):
        raise ValueError(f"{fuser_folder} does not name the receiver and sharer it was trained for; retrain it")
    for key in ("output", "alignment"):  # the run's folder is the caller's; alignment is the fuser's
        raw.pop(key, None)
    return {**raw, "receiver": fuser.receiver, "sharer": fuser.sharer,
            "fuser": {"checkpoint": repo_relative(fuser_folder)}}


def evaluate_pair(pair: Pair, fuser_folder: Path, base: str | os.PathLike, out: str | os.PathLike, *, benchmark: str,
                  limit: int | None, t2t_limit: int) -> tuple[Path, Path | None]:
    """Evaluate a pair (``run_eval``, per-item records kept and reused): receiver, sharer and C2C into ``out``,
    T2T on the first ``t2t_limit`` items into ``out``/t2t_subset (none if 0); the two folders."""
    out = Path(out)
    config = eval_config_for_pair(base, fuser_folder, benchmark=benchmark, limit=limit, methods=PAIR_METHODS,
                                  name=f"pair-{pair.slug}")
    run_eval(config, out, command=f"c2c.pairs.evaluate_pair: {pair.label}")
    if not t2t_limit:
        return out, None
    t2t_config = eval_config_for_pair(base, fuser_folder, benchmark=benchmark, limit=t2t_limit, methods=T2T_METHODS,
                                      name=f"pair-{pair.slug}-t2t")
    run_eval(t2t_config, out / "t2t_subset", command=f"c2c.pairs.evaluate_pair: {pair.label}, T2T subset")
    return out, out / "t2t_subset"


def non_embedding_parameters(source: str) -> int:
    """A model's parameters without its input embedding and output head, from its config alone (no weights are
    read): a size that does not depend on whether a checkpoint ties the two (our GGUF conversions do not)."""
    location, gguf = resolve_model_source(source)
    config = AutoConfig.from_pretrained(location, **({"gguf_file": gguf} if gguf else {}))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embeddings = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())}
    return model.num_parameters() - sum(embeddings.values())


def pair_row(pair: Pair, out: str | os.PathLike, t2t_out: str | os.PathLike | None, *, benchmark: str,
             keys: dict[str, str] | None = None) -> dict:
    """One row of the pairs table from the records of ``out`` (receiver, sharer, C2C) and ``t2t_out`` (T2T on a
    subset, or None): the models and their sizes (non-embedding parameters), the fuser's ``sharer_mlp_layers`` (0:
    default C2C, 3: the paper's C2C-C, Table 9) and training steps, accuracies (%) with 95% intervals, C2C - receiver
    with its paired 95% interval and exact McNemar p, C2C's PGR ((C2C - receiver) / (sharer - receiver), None unless
    the sharer beats the receiver), and on the T2T subset T2T - receiver and C2C - T2T the same way. ``keys``: the
    record key of a method where it is not the method's name (``{"c2c": "c2c_logits"}``: an evaluation config whose
    methods carry no key)."""
    keys = {method: method for method in PAIR_METHODS + T2T_METHODS} | (keys or {})
    records = {method: method_records(out, keys[method], benchmark) for method in PAIR_METHODS}
    fuser = FuserConfig.from_json_file(pair.run / "final" / CONFIG_NAME)
    row = {"pair": pair.label, "receiver_model": fuser.receiver, "sharer_model": fuser.sharer,
           "receiver_size": non_embedding_parameters(fuser.receiver), "sharer_size": non_embedding_parameters(fuser.sharer),
           "sharer_mlp_layers": fuser.sharer_mlp_layers, "train_steps": train_steps(pair.run), "benchmark": benchmark,
           "n": len(records["c2c"])}
    for key in PAIR_METHODS:
        row.update(_accuracy(key, records[key]))
    row.update(_gain("c2c", paired_by_id(records["c2c"], records["receiver"])))
    recovered = pgr(row["c2c"], row["receiver"], row["sharer"])
    row["c2c_pgr"] = None if recovered is None else round(100 * recovered, 2)
    if t2t_out is not None:
        t2t = method_records(t2t_out, keys["t2t"], benchmark)
        versus_receiver = paired_by_id(t2t, records["receiver"])
        row.update({"t2t": round(100 * versus_receiver.accuracy_a, 2), "t2t_n": versus_receiver.n,
                    **_gain("t2t", versus_receiver)})
        versus_t2t = paired_by_id(records["c2c"], t2t)
        row.update({"c2c_minus_t2t": round(100 * versus_t2t.difference, 2), "c2c_minus_t2t_p": versus_t2t.p_value})
    return row


def train_steps(run: Path) -> int:
    """The optimizer steps of a finished training run (its ``data_stats.json``, written by ``c2c.train``)."""
    stats = Path(run) / "data_stats.json"
    if not stats.is_file():
        raise FileNotFoundError(f"{stats} does not exist: {run} is not a c2c.train run folder; train the pair first")
    return int(json.loads(stats.read_text(encoding="utf-8"))["total_steps"])


def complex_partners(rows: list[dict]) -> list[tuple[dict, dict]]:
    """Table 9's comparisons: each C2C-C row (``sharer_mlp_layers`` > 0) with the default fuser's row of the same
    receiver and sharer trained for the nearest number of steps (the first such row on a tie): a longer-trained
    C2C-C is compared with a longer-trained default fuser where the table has one. Both rows carry their steps."""
    partners = []
    for row in rows:
        if not row["sharer_mlp_layers"]:
            continue
        same = [r for r in rows if not r["sharer_mlp_layers"]
                and (r["receiver_model"], r["sharer_model"]) == (row["receiver_model"], row["sharer_model"])]
        if not same:
            raise ValueError(f"{row['pair']}: no pair with the same models and the default fuser to compare it with; "
                             "add one to pair_runs")
        partners.append((min(same, key=lambda r: abs(r["train_steps"] - row["train_steps"])), row))
    return partners


def _accuracy(column: str, records: list[dict]) -> dict:
    """Table columns: accuracy (%) as ``column`` and its 95% Wilson interval as ``column``_ci95_low/_high."""
    correct, n = sum(bool(r["correct"]) for r in records), len(records)
    low, high = wilson_interval(correct, n)
    return {column: round(100 * correct / n, 2), f"{column}_ci95_low": round(100 * low, 2),
            f"{column}_ci95_high": round(100 * high, 2)}


def _gain(method: str, comparison) -> dict:
    """A paired comparison with the receiver as table columns (percentage points)."""
    return _difference(f"{method}_gain", comparison)


def _difference(column: str, comparison) -> dict:
    """A paired difference (percentage points) as columns ``column``, ``column``_low/_high and ``column``_p."""
    low, high = comparison.interval
    return {column: round(100 * comparison.difference, 2), f"{column}_low": round(100 * low, 2),
            f"{column}_high": round(100 * high, 2), f"{column}_p": comparison.p_value}


def evaluate_combination(pairs: list[Pair], finals: list[Path], base: str | os.PathLike, out: str | os.PathLike, *,
                         benchmark: str, limit: int | None, multi_sharer: str = "sequential") -> Path:
    """The paper's Table 13: pairs that share a receiver, their separately trained fusers fused in together at
    inference (no further training; ``multi_sharer`` says how), evaluated with the receiver alone into ``out``."""
    configs = [FuserConfig.from_json_file(Path(final) / CONFIG_NAME) for final in finals]
    receivers = {config.receiver for config in configs}
    if len(pairs) < 2 or len(receivers) != 1:
        raise ValueError(f"a combination needs two or more pairs with one receiver; {[p.label for p in pairs]} have "
                         f"receivers {sorted(map(str, receivers))}")
    config = eval_config_for_pair(base, finals[0], benchmark=benchmark, limit=limit, methods=("receiver",),
                                  name="combination-" + "+".join(p.slug for p in pairs))
    more = [{"sharer": c.sharer, "fuser": {"checkpoint": repo_relative(final)}} for c, final in zip(configs[1:], finals[1:])]
    config["methods"].append({"name": "c2c", "key": "c2c", "multi_sharer": multi_sharer, "more_sharers": more})
    run_eval(config, out, command="c2c.pairs.evaluate_combination: " + " + ".join(p.label for p in pairs))
    return Path(out)


def combination_rows(pairs: list[Pair], pair_outs: list[Path], out: str | os.PathLike, *, benchmark: str) -> list[dict]:
    """Table 13's rows on the combination's items: the receiver alone, each sharer alone, each pair's C2C and the
    combination's, with 95% intervals and (for the C2C rows) the paired gain over the receiver and exact McNemar p."""
    receiver = method_records(out, "receiver", benchmark)
    rows = [("receiver alone", receiver)]
    rows += [(f"sharer alone: {pair.label}", method_records(folder, "sharer", benchmark))
             for pair, folder in zip(pairs, pair_outs)]
    rows += [(f"C2C: {pair.label}", method_records(folder, "c2c", benchmark)) for pair, folder in zip(pairs, pair_outs)]
    rows.append(("C2C, all fusers at once", method_records(out, "c2c", benchmark)))
    ids = {r["id"] for r in receiver}
    table = []
    for name, records in rows:
        records = [r for r in records if r["id"] in ids]
        if len(records) != len(ids):
            raise ValueError(f"{name}: records of {len(records)} of the combination's {len(ids)} items; evaluate "
                             "the pairs on the same benchmark and limit first")
        row = {"row": name, **_accuracy("accuracy", records), "n": len(records)}
        if name.startswith("C2C"):
            row.update(_gain("c2c", paired_by_id(records, receiver)))
        table.append(row)
    return table
