"""The results of methods on benchmarks and the main table they make: ``BenchmarkResult`` (one method on one
benchmark, as ``c2c.evaluate.evaluate`` returns it) and ``EvalReport`` (every method and benchmark of a config:
accuracies with intervals, PGR, paired comparisons, counts; written as ``main_table.md|csv|json``)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from c2c.eval_config import EVAL_CONFIG
from c2c.routing import ROUTING_KEY, ROUTING_LABEL, route
from c2c.stats import paired_by_id, pgr, wilson_interval

BENCHMARK_TITLES = {"mmlu-redux": "MMLU-Redux", "arc-challenge": "ARC-C", "openbookqa": "OpenBookQA",
                    "ceval": "C-Eval", "mmlu": "MMLU", "mc-mix-held-out": "MC mix, held out"}
EXAMPLES_SHOWN = 3  # parse-failure and error examples per benchmark in the table


@dataclass
class BenchmarkResult:
    """The outcome of one method on one benchmark."""

    method: str  # the method's key (its run folder)
    label: str
    benchmark: str
    records: list[dict]  # one per item, in item order
    dropped: dict[str, int] = field(default_factory=dict)  # items the benchmark's rules removed

    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def correct(self) -> int:
        return sum(r["correct"] for r in self.records)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def parse_failures(self) -> int:
        return sum(r["parse_failure"] for r in self.records)

    @property
    def parse_failure_examples(self) -> list[dict]:
        return [{"id": r["id"], "text": r["text"]} for r in self.records if r["parse_failure"]][:EXAMPLES_SHOWN]

    @property
    def errors(self) -> int:
        """Items whose method raised (counted wrong)."""
        return sum(bool(r.get("error")) for r in self.records)

    @property
    def error_examples(self) -> list[dict]:
        return [{"id": r["id"], "error": r["error"]} for r in self.records if r.get("error")][:EXAMPLES_SHOWN]

    @property
    def seconds(self) -> float:
        return sum(r["seconds"] for r in self.records)

    @property
    def items_per_s(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "label": self.label, "benchmark": self.benchmark, "n": self.n,
                "correct": self.correct, "accuracy": self.accuracy, "parse_failures": self.parse_failures,
                "parse_failure_examples": self.parse_failure_examples, "errors": self.errors,
                "error_examples": self.error_examples, "seconds": self.seconds,
                "items_per_s": self.items_per_s, "dropped_by_rules": self.dropped}


@dataclass
class EvalReport:
    """All results of a config: ``results[(method key, benchmark)]``."""

    config: dict
    out: Path
    methods: list[dict]  # method entries, with "label" filled in
    benchmarks: list[str]
    results: dict[tuple[str, str], BenchmarkResult]
    command: str = ""

    def average(self, key: str) -> float | None:
        """Mean of the per-benchmark accuracies (the paper's Average), if every benchmark is done."""
        values = [self.results[(key, b)].accuracy for b in self.benchmarks if (key, b) in self.results]
        return sum(values) / len(values) if len(values) == len(self.benchmarks) else None

    def rows(self) -> list[dict]:
        """One dict per method: accuracy (%), N, parse failures and items/s per benchmark, and the average."""
        rows = []
        for m in self.methods:
            row = {"method": m["key"], "label": m["label"], "scoring": m["scoring"]}
            for b in self.benchmarks:
                r = self.results.get((m["key"], b))
                row[b] = round(100 * r.accuracy, 2) if r else None
                low, high = wilson_interval(r.correct, r.n) if r else (None, None)
                row[f"{b}_ci95_low"] = round(100 * low, 2) if r else None
                row[f"{b}_ci95_high"] = round(100 * high, 2) if r else None
                row[f"{b}_n"] = r.n if r else None
                row[f"{b}_parse_failures"] = r.parse_failures if r else None
                row[f"{b}_errors"] = r.errors if r else None
                row[f"{b}_items_per_s"] = round(r.items_per_s, 3) if r else None
            avg = self.average(m["key"])
            row["average"] = round(100 * avg, 2) if avg is not None else None
            rows.append(row)
        return rows

    def _method_of(self, name: str) -> str | None:
        """The key of the run's (first) method of this name, e.g. "receiver"."""
        return next((m["key"] for m in self.methods if m["name"] == name), None)

    def add_routing(self) -> None:
        """The derived routing row (c2c.routing) from the receiver's and sharer's results, where both ran."""
        weak, strong = self._method_of("receiver"), self._method_of("sharer")
        if weak is None or strong is None:
            return
        for b in self.benchmarks:
            receiver, sharer = self.results.get((weak, b)), self.results.get((strong, b))
            if receiver and sharer:
                self.results[(ROUTING_KEY, b)] = BenchmarkResult(ROUTING_KEY, ROUTING_LABEL, b,
                                                                 route(receiver.records, sharer.records),
                                                                 receiver.dropped)
        self.methods.append({"key": ROUTING_KEY, "name": ROUTING_KEY, "label": ROUTING_LABEL, "scoring": "logits"})

    def comparisons(self) -> list[dict]:
        """One row per configured pair (a, b) and benchmark: the paired comparison on the items both answered."""
        rows = []
        for a, b in self.config["comparisons"]:
            for bench in self.benchmarks:
                ra, rb = self.results.get((a, bench)), self.results.get((b, bench))
                c = paired_by_id(ra.records, rb.records) if ra and rb else None
                if c is None:
                    continue
                rows.append({"a": a, "b": b, "benchmark": bench, "n": c.n,
                             "accuracy_a": round(100 * c.accuracy_a, 2), "accuracy_b": round(100 * c.accuracy_b, 2),
                             "difference": round(100 * c.difference, 2),
                             "ci95_low": round(100 * c.interval[0], 2), "ci95_high": round(100 * c.interval[1], 2),
                             "a_only": c.a_only, "b_only": c.b_only, "mcnemar_p": c.p_value})
        return rows

    def gap_recovered(self) -> list[dict]:
        """PGR of every other method per benchmark: (method - receiver) / (sharer - receiver), where both ran."""
        weak, strong = self._method_of("receiver"), self._method_of("sharer")
        rows = []
        if weak is None or strong is None:
            return rows
        for m in self.methods:
            if m["key"] in (weak, strong):
                continue
            row = {"method": m["key"]}
            for b in self.benchmarks:
                r, w, s = (self.results.get((k, b)) for k in (m["key"], weak, strong))
                value = pgr(r.accuracy, w.accuracy, s.accuracy) if r and w and s else None
                row[b] = None if value is None else round(100 * value, 1)
            rows.append(row)
        return rows

    def markdown(self) -> str:
        titles = [BENCHMARK_TITLES.get(b, b) for b in self.benchmarks]
        cfg = self.config
        lines = [f"# Main table: {cfg['name']}", "",
                 f"Receiver: `{cfg['receiver']}`; sharer: `{cfg['sharer']}`"
                 + "".join(f"; {m['key']}: sharer `{m['sharer']}`, fuser `{m['fuser']}`"
                           for m in self.methods if m["name"] == "c2c")
                 + f". Zero-shot, one user turn, thinking disabled; dtype {cfg['dtype']}.", "",
                 "Accuracy (%) [95% Wilson interval]; parse failures and items that raised count as wrong. "
                 "Average = mean over the benchmarks."
                 + (" Routing: each query answered by the receiver or the sharer alone, half each, by the receiver's "
                    "confidence in its own answer (c2c.routing: an offline stand-in for the paper's RouteLLM router; "
                    "its time is the receiver's plus the sharer's on the routed half)."
                    if any(m["key"] == ROUTING_KEY for m in self.methods) else ""), "",
                 "| Method | Scoring | " + " | ".join(titles) + " | Average |",
                 "|---|---|" + "---:|" * (len(titles) + 1)]

        def fmt(x):
            return "-" if x is None else f"{x:.2f}"

        def cell(row, b):
            return fmt(row[b]) + ("" if row[b] is None else f" [{row[f'{b}_ci95_low']:.1f}, {row[f'{b}_ci95_high']:.1f}]")

        rows = self.rows()
        for m, row in zip(self.methods, rows):
            scoring = m["scoring"] + (f", {m['max_new_tokens']} tokens" if m["scoring"] == "generate" else "")
            if m["name"] == "t2t":
                scoring += f"; sharer text ({m['t2t_protocol']}) <= {m['sharer_max_new_tokens']} tokens"
            lines.append(f"| {m['label']} | {scoring} | " + " | ".join(cell(row, b) for b in self.benchmarks)
                         + f" | {fmt(row['average'])} |")
        labels = {m["key"]: m["label"] for m in self.methods}
        gaps = self.gap_recovered()
        if gaps:
            lines += ["", "Performance gap recovered, PGR = (method - receiver) / (sharer - receiver), %:", "",
                      "| Method | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(titles)]
            lines += [f"| {labels[g['method']]} | " + " | ".join("-" if g[b] is None else f"{g[b]:.1f}"
                                                                  for b in self.benchmarks) + " |" for g in gaps]
        paired = self.comparisons()
        if paired:
            lines += ["", "Comparisons on the same items (paired): difference of accuracies (points) with its 95% "
                      "interval, the items only one of the two answers correctly, and the exact McNemar p-value:", "",
                      "| A vs B | Benchmark | N | A | B | A - B [95% CI] | only A | only B | p |",
                      "|---|---|---:|---:|---:|---|---:|---:|---:|"]
            lines += [f"| {labels[c['a']]} vs {labels[c['b']]} | {BENCHMARK_TITLES.get(c['benchmark'], c['benchmark'])} "
                      f"| {c['n']} | {c['accuracy_a']:.2f} | {c['accuracy_b']:.2f} | {c['difference']:+.2f} "
                      f"[{c['ci95_low']:+.1f}, {c['ci95_high']:+.1f}] | {c['a_only']} | {c['b_only']} "
                      f"| {c['mcnemar_p']:.2g} |" for c in paired]
        lines += ["", "Items evaluated (N), parse failures, items that raised (errors), and throughput (items/s, "
                  "batched, this machine):", "",
                  "| Method | " + " | ".join(titles) + " |", "|---|" + "---|" * len(titles)]
        for m in self.methods:
            cells = []
            for b in self.benchmarks:
                r = self.results.get((m["key"], b))
                cells.append("-" if r is None else
                             f"N={r.n}, parse failures {r.parse_failures}, errors {r.errors}, "
                             f"{r.items_per_s:.2f} items/s")
            lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
        for heading, count, examples, field_shown, chars in (
                ("Parse failure examples (first few per benchmark):", "parse_failures", "parse_failure_examples",
                 "text", 120),
                ("Items that raised (counted wrong; a rerun retries them), first few per benchmark:", "errors",
                 "error_examples", "error", 200)):
            found = [(m, b, self.results[(m["key"], b)]) for m in self.methods for b in self.benchmarks
                     if (m["key"], b) in self.results and getattr(self.results[(m["key"], b)], count)]
            if found:
                lines += ["", heading, ""]
            for m, b, r in found:
                shown = "; ".join(f"`{e['id']}`: {json.dumps(e[field_shown][:chars], ensure_ascii=False)}"
                                  for e in getattr(r, examples))
                lines.append(f"- {m['label']} / {b}: {getattr(r, count)} of {r.n} — {shown}")
        dropped = {b: r.dropped for (k, b), r in self.results.items() if r.dropped}
        if dropped:
            lines += ["", "Items removed by the benchmarks' rules (before evaluation): "
                      + "; ".join(f"{b}: " + ", ".join(f"{k} {v}" for k, v in d.items()) for b, d in dropped.items())]
        sources = "; ".join(f"{b['name']}: {b['source'] or 'hub'}" + (f" (split {b['split']})" if b["split"] else "")
                            + (f", limit {b['limit']}" if b["limit"] else "") for b in cfg["benchmarks"])
        lines += ["", f"Benchmarks: {sources}.", "", f"Produced by: `{self.command}`; exact config: `{EVAL_CONFIG}`.", ""]
        return "\n".join(lines)

    def write(self) -> None:
        rows = self.rows()
        with (self.out / "main_table.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (self.out / "main_table.md").write_text(self.markdown(), encoding="utf-8")
        summary = {"name": self.config["name"], "command": self.command,
                   "results": [r.summary() for r in self.results.values()], "table": rows,
                   "gap_recovered": self.gap_recovered(), "comparisons": self.comparisons()}
        (self.out / "main_table.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
