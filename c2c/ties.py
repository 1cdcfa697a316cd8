"""Exact ties between answer letters in letter-logit scoring, and the accuracy they leave undecided.

With the models in bf16 the lm_head's logits are rounded to bf16 (a step of 0.0625 at logits of 8-16),
so two letters often get the very same log-probability. The evaluation then takes the first letter of
the tie (``c2c.methods``: deterministic, but an arbitrary preference for the earlier letter). This module
measures how much that matters, from the per-item records alone:

* ``tied_letters(scores)``: the letters that share the highest score.
* ``tie_summary(records)``: items, items with a tie at the top, ties whose letters include the gold one,
  the recorded accuracy, and the *tie-split* accuracy: each tied item counts 1/k when the gold letter is
  one of its k tied letters (the expected accuracy if ties were broken uniformly at random).
* ``python -m c2c.ties --eval-out results/<profile>/<run>``: both for every method and benchmark of a run,
  one row each, written to ``<eval-out>/ties.csv`` and ``ties.md``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from c2c.oracle import write_table
from c2c.records import method_records


def tied_letters(scores: dict[str, float]) -> list[str]:
    """The letters whose score equals the highest (one letter when there is no tie)."""
    best = max(scores.values())
    return [letter for letter, value in scores.items() if value == best]


def tie_summary(records: Sequence[dict]) -> dict:
    """Ties at the top of the letter scores of these records, and the accuracy with ties split evenly.

    Records without letter scores (generate scoring, or an item that raised) count with their recorded
    ``correct`` in both accuracies.
    """
    if not records:
        raise ValueError("tie_summary needs at least one record")
    tied = gold_tied = 0
    split = 0.0
    for record in records:
        scores = record.get("scores") or {}
        top = tied_letters(scores) if scores else []
        if len(top) > 1:
            tied += 1
            gold_tied += record["gold"] in top
            split += (record["gold"] in top) / len(top)
        else:
            split += bool(record["correct"])
    n = len(records)
    return {"items": n, "tied": tied, "gold_among_tied": gold_tied,
            "accuracy": 100 * sum(bool(r["correct"]) for r in records) / n, "tie_split_accuracy": 100 * split / n}


def run_ties(out: str | os.PathLike) -> list[dict]:
    """One row (method, benchmark and its ``tie_summary``) per record file under ``<out>/eval``."""
    folder = Path(out) / "eval"
    files = sorted(folder.glob("*/*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no per-item records under {folder}: run the evaluation first "
                                "(python -m c2c.evaluate --config <its config>)")
    return [{"method": path.parent.name, "benchmark": path.stem,
             **tie_summary(method_records(out, path.parent.name, path.stem))} for path in files]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Count exact ties between answer letters in an evaluation's "
                                                 "records and the accuracy with ties split evenly.")
    parser.add_argument("--eval-out", required=True, help="the evaluation's output folder (results/<profile>/...)")
    args = parser.parse_args(argv)
    csv_path, md_path = write_table(run_ties(args.eval_out), Path(args.eval_out) / "ties")
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
