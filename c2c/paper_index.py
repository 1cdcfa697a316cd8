"""The reproduction index: one row per table and figure of the paper (v2: Tables 1-15, Figures 1-13), plus
the appendix's gate analysis, saying which notebook regenerates it, which files it wrote and how it stands.

``ENTRIES`` is the data. Paths are relative to the repository, with ``{results}`` = results/<profile>,
``{figures}`` = figures/<profile> and ``{eval_out}`` = the run folder of the evaluation the analyses read
(``analysis_eval_out`` in params/<profile>.yaml). ``build_index`` checks every named file and gives each
row a status:

* ``reproduced``: computed in the paper profile with the paper's models and data for that item;
* ``stand-in``: the same analysis on this profile's models and data;
* ``schematic``: a diagram, nothing to compute;
* ``not run``: with the reason its notebook gave for not running in this profile
  (``c2c.paths.not_run_note``), or else the files it lacks.

A stand-in's ``reason`` column holds its note (how it differs from the paper's item), if it has one.

A row lists only files that exist (missing ones are named in its reason), and the paper's headline number
beside ours (read from our result file) where one exists.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from c2c.oracle import write_table
from c2c.paths import not_run_note

@dataclass(frozen=True)
class Entry:
    """One table or figure of the paper."""

    item: str  # "Table 1", "Figure 4", "Appendix A.4.2"
    title: str
    notebook: str | None = None  # the notebook's stem, None if nothing is computed
    results: tuple[str, ...] = ()  # result tables (CSV and MD), path templates
    figures: tuple[str, ...] = ()  # figures (PNG and PDF), path templates
    kind: str = "computed"  # computed | schematic
    note: str = ""  # how a stand-in differs from the paper's item
    paper: str = ""  # the paper's headline number(s)
    ours: Callable[[list[dict]], str] | None = None  # our headline, from the rows of the first result CSV
    paper_profile_reproduces: bool = False  # the paper profile runs it with the paper's models and data


def _both(stem: str) -> tuple[str, str]:
    return f"{stem}.csv", f"{stem}.md"


def _figure(stem: str) -> tuple[str, str]:
    return f"{{figures}}/{stem}.png", f"{{figures}}/{stem}.pdf"


def _pct(value) -> str:
    return f"{100 * float(value):.1f}"


def _ours_enrichment(rows):
    return ", ".join(f"{r['method']} {_pct(r['accuracy'])}" for r in rows)


def _ours_erank(rows):
    return "; ".join(f"{r['cache']}: sharer {float(r['sharer']):.0f} / receiver {float(r['receiver']):.0f} / "
                     f"C2C {float(r['fused']):.0f}" for r in rows)


def _ours_time(rows):
    return ", ".join(f"{r['method']} {float(r['mean_ms']):.0f} ms" for r in rows) + " (mean per query)"


def _ours_main(rows):
    return ", ".join(f"{r['method']} {r['average']}" for r in rows) + " (average accuracy)"


def _ours_sources(rows):
    """Table 6's three rows of the main table (average accuracy), "not run" where a row is missing."""
    averages = {r["method"]: r["average"] for r in rows}  # keyed by method key: c2c, or c2c_<scoring> unnamed
    c2c = next((k for k in averages if k == "c2c" or (k.startswith("c2c_") and k != "c2c_identical")), None)
    return ", ".join(f"{label} {averages.get(key) or 'not run'}" for key, label in
                     (("single", "Single"), ("c2c_identical", "Identical"), (c2c, "C2C"))) + " (average accuracy)"


def _ours_ablation(rows):
    """Benchmark accuracy of each variant, per benchmark (notebook 07's ablations_benchmark: Table 8's measure); for
    its other table, accuracy on held-out facts where it trained on the fact task, else the held-out loss."""
    if all(r.get("c2c") not in (None, "") for r in rows):
        parts = []  # a table written before 07 scored several benchmarks has no benchmark column: one group
        for benchmark in dict.fromkeys(r.get("benchmark") for r in rows):
            same = [r for r in rows if r.get("benchmark") == benchmark]
            parts.append((f"{benchmark}: " if benchmark else "")
                         + ", ".join(f"{r['variant']} {float(r['c2c']):.1f}" for r in same)
                         + f" (accuracy %, {same[0]['n']} items; receiver {float(same[0]['receiver']):.1f}, "
                           f"sharer {float(same[0]['sharer']):.1f})")
        benchmarks = {r.get("benchmark") for r in rows}
        on_all = [v for v in dict.fromkeys(r["variant"] for r in rows)  # the paper's measure: the mean of its four
                  if {r.get("benchmark") for r in rows if r["variant"] == v} == benchmarks]
        if len(benchmarks) > 1 and on_all:
            parts.append(f"mean of {len(benchmarks)}: " + ", ".join(
                f"{v} {sum(float(r['c2c']) for r in rows if r['variant'] == v) / len(benchmarks):.2f}" for v in on_all))
        return "; ".join(parts)
    if all(r.get("answer_accuracy") not in (None, "") for r in rows):
        return ", ".join(f"{r['variant']} {_pct(r['answer_accuracy'])}" for r in rows) + " (held-out facts)"
    return ", ".join(f"{r['variant']} {float(r['held_out_loss']):.3f}" for r in rows) + " (held-out loss, nats/token)"


def _ours_layers(rows):
    singles = sorted(rows, key=lambda r: float(r["delta"]))
    return (f"best single layer {singles[-1]['layer']} ({100 * float(singles[-1]['delta']):+.1f}), worst "
            f"{singles[0]['layer']} ({100 * float(singles[0]['delta']):+.1f}) vs Direct")


def _ours_best_worst(rows):
    by_kind = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    parts = [f"{kind} max {_pct(max(float(r['accuracy']) for r in found))}" for kind, found in by_kind.items()
             if kind in ("best-k", "worst-k")]
    reference = {r["kind"]: _pct(r["accuracy"]) for r in rows if r["kind"] in ("none", "few-shot", "all")}
    return ", ".join(parts + [f"Direct {reference.get('none')}, Few-shot {reference.get('few-shot')}, "
                              f"Oracle {reference.get('all')}"])


def _ours_tsne(rows):
    return ", ".join(f"layer {r['layer']}: {float(r['nn_ratio_projected']):.2f} vs raw {float(r['nn_ratio_sharer']):.2f}"
                     for r in rows) + " (nearest-neighbour ratio)"


def _ours_overlap(rows):
    parts = [f"{r['benchmark']}: {_pct(r['sharer_correct_also_c2c'])}%" for r in rows if r["sharer_correct_also_c2c"]]
    return ", ".join(parts) + " of sharer-correct items also correct with C2C" if parts else "no sharer-correct items"


def _ours_subcategories(rows):
    c2c = [r for r in rows if r["method"] == "c2c"]
    return f"C2C above the receiver in {sum(float(r['gain']) > 0 for r in c2c)} of {len(c2c)} subcategories"


def _ours_fraction(rows):
    return ", ".join(f"{r['side']} {_pct(r['fraction'])}%: {_pct(r['accuracy'])}" for r in rows
                     if float(r["fraction"]) == 0.5)


def _ours_checkpoints(rows):
    run = [r for r in rows if r["run"] == rows[0]["run"]]  # the first run of the table
    best = max(run, key=lambda r: float(r["accuracy"]))
    return (f"{run[0]['run']}: step 0 {_pct(run[0]['accuracy'])}, best {_pct(best['accuracy'])} at step "
            f"{best['step']} ({float(best['hours']):.2f} h), final {_pct(run[-1]['accuracy'])}")


def _ours_curves(rows):
    evals = [r for r in rows if r["eval_loss"]]
    return ", ".join(f"{run}: eval loss {float(found[0]['eval_loss']):.3f} -> {float(found[-1]['eval_loss']):.3f}"
                     for run in dict.fromkeys(r["run"] for r in evals)
                     for found in [[r for r in evals if r["run"] == run]])


def _ours_pairs(rows):
    return "; ".join(f"{r['pair']}: receiver {float(r['receiver']):.1f}, C2C {float(r['c2c']):.1f}"
                     + (f", T2T {float(r['t2t']):.1f} (first {r['t2t_n']})" if r.get("t2t") else "") for r in rows)


def _ours_sizes(rows):
    gains = "; ".join(f"sharer {int(r['sharer_size']) / 1e6:.3g}M: C2C {float(r['c2c_gain']):+.1f}"
                      + (f", T2T {float(r['t2t_gain']):+.1f}" if r.get("t2t_gain") else "") for r in rows)
    return gains + " (gain over the receiver, points)"


def _ours_two_sharers(rows):
    return ", ".join(f"{r['row']} {float(r['accuracy']):.1f}" for r in rows if r["row"].startswith(("receiver", "C2C")))


def _ours_longbench(rows):
    def value(row, method):
        return f"{float(row[method]):.2f}" if row.get(method) not in (None, "") else "-"

    return "; ".join(f"{row['bucket']}: receiver {value(row, 'receiver')}, T2T {value(row, 't2t')}, "
                     f"C2C {value(row, 'c2c')}" for row in rows)


def _ours_latent(rows):
    receivers = [k for k in rows[0] if k != "sharers" and not k.endswith(("_low", "_high", "_n", "_gain", "_gain_p"))]
    return "; ".join(f"{receiver}: " + ", ".join(f"{row['sharers']} {float(row[receiver]):.1f}" for row in rows)
                     for receiver in receivers)


def _ours_workflow(rows):
    return ", ".join(f"{r['method']} {float(r['accuracy']):.1f}" for r in rows) + f" ({rows[0]['n']} problems)"


def _ours_complex(rows):
    def pgr(value):
        return f" (PGR {float(value):.0f}%)" if value not in ("", None) else ""

    return "; ".join(f"C2C {float(r['c2c']):.1f}{pgr(r['c2c_pgr'])} ({r['train_steps']} steps), C2C-C "
                     f"{float(r['c2c_complex']):.1f}{pgr(r['c2c_complex_pgr'])} ({r['c2c_complex_train_steps']} steps)"
                     for r in rows)


def _ours_gates(rows):
    return ", ".join(f"{r['fuser']}: {_pct(r['all_open'])}% open" for r in rows)


ENTRIES: tuple[Entry, ...] = (
    Entry("Table 1", "Cache enrichment oracle (Direct / Few-shot / Oracle)", "01_oracle_cache_enrichment",
          _both("{results}/oracle_cache_enrichment"), _figure("oracle_cache_enrichment"),
          paper="Direct 58.42, Few-shot 63.39, Oracle 62.34 (MMLU-Redux)", ours=_ours_enrichment),
    Entry("Table 2", "Average effective rank of K and V caches", "10_effective_rank",
          _both("{results}/effective_rank"), _figure("effective_rank"),
          paper="K: sharer 539 / receiver 388 / C2C 395; V: 689 / 532 / 560 (Qwen3-4B -> Qwen3-0.6B)",
          ours=_ours_erank),
    Entry("Table 3", "Tokens and time per phase", "11_phase_timing",
          _both("{results}/time_per_query") + _both("{results}/phase_timing"), _figure("phase_timing"),
          paper="per query: receiver 308 ms, sharer 346, T2T 1596, C2C 445 incl. 90 ms fusion (A100)",
          ours=_ours_time, paper_profile_reproduces=True),
    Entry("Table 4", "Main results: accuracy and time on four benchmarks", "04_main_table",
          _both("{eval_out}/main_table"), _figure("main_table"),
          paper="Qwen2.5-0.5B sharer, mean of 4: receiver 36.95, sharer 41.58, Routing 37.92, T2T 42.60, C2C 47.95",
          ours=_ours_main, paper_profile_reproduces=True,
          note="Routing, where present, is an offline stand-in (c2c.routing: the receiver's confidence in place of "
               "RouteLLM's router)"),
    Entry("Table 5", "LongBench by input length (Qwen2.5-0.5B -> Qwen3-0.6B)", "18_longbench",
          _both("{results}/longbench_table5") + _both("{results}/longbench_table5_datasets"), _figure("longbench_table5"),
          paper="C2C 37.31 / 34.01 / 30.72 (0-4k / 4-8k / 8k+) vs T2T 33.46 / 29.70 / 25.64", ours=_ours_longbench,
          paper_profile_reproduces=True,
          note="this project's prompts unless params longbench_prompts names LongBench's official file; the split is "
               "per sub-dataset; metrics written from LongBench's definitions (c2c.longbench)"),
    Entry("Table 6", "Single / Identical / C2C", "04_main_table",
          (*_both("{eval_out}/main_table"), *_both("{results}/training")), _figure("main_table"),
          paper="mean of 4: Single 41.52, Identical 46.41, C2C 47.95", ours=_ours_sources,
          paper_profile_reproduces=True,
          note="rows of the main table: Identical (params control_train_config) and Single (single_baseline, "
               "c2c.single) are trained by notebook 03, whose training table gives their trainable parameters; "
               "the small profile has no Single (a full fine-tune of its 0.5B receiver: ~8 CPU hours, estimated)"),
    Entry("Table 7", "Other model combinations and swapped roles", "16_model_pairs",
          _both("{results}/model_pairs"), _figure("model_pairs_gain"),
          paper="Qwen2.5-Coder-0.5B -> Qwen3-0.6B: receiver 35.53, T2T 39.74, C2C 46.89 (MMLU-Redux)", ours=_ours_pairs,
          note="the profile's own pairs (params pair_runs); the paper profile has Table 7's rows, Gemma3-1B's "
               "rehearsed with SmolLM2's tokenizer standing in for Gemma 3's (not among the offline tokenizers)"),
    Entry("Table 8", "Fuser ablation: Project / +Fuse / +Gate", "07_ablations",
          (*_both("{results}/ablations_benchmark"), *_both("{results}/ablations_comparisons"), *_both("{results}/ablations")),
          (*_figure("ablations_benchmark"), *_figure("ablations")),
          paper="mean of 4: Project 20.70, +Fuse 44.88, +Gate 47.95", ours=_ours_ablation,
          note="the variants of params ablation_eval_runs trained and scored on the benchmarks of ablation_benchmarks "
               "(ablations_benchmark: Table 8's measure; the small profile's are in the MC regime, all on ARC, the "
               "no-gate variant, its Identical control and the gated fuser also on MMLU and OpenBookQA; ablations_comparisons: "
               "one variant minus another, paired); ablations.csv|md: the variants on "
               "the knowledge-transfer task (held-out facts) or the training task (held-out loss)"),
    Entry("Table 9", "Default C2C vs C2C-C with PGR (Qwen3-4B -> Qwen3-0.6B)", "16_model_pairs",
          _both("{results}/complex_fuser"), _figure("complex_fuser"), paper="MMLU-Redux: T2T 42.95, C2C 45.92, C2C-C 62.78 (PGR 76%)",
          ours=_ours_complex, note="a pair of pair_runs whose fuser has sharer_mlp_layers: 3 beside the pair with the "
                                   "same models, the default fuser and the nearest number of training steps "
                                   "(c2c.pairs.complex_partners)"),
    Entry("Table 10", "Accuracy with one layer enriched", "02_layer_enrichment",
          _both("{results}/layer_enrichment"), _figure("layer_enrichment"),
          paper="layers 4 (58.52) and 16 (58.45) beat Direct (58.42); worst 14 (54.24)", ours=_ours_layers),
    Entry("Table 11", "Strong sharer on LongBench (Qwen3-4B -> Qwen3-0.6B)", "18_longbench",
          _both("{results}/longbench_table11") + _both("{results}/longbench_table11_datasets"),
          _figure("longbench_table11"), paper="average: receiver 27.63, T2T 36.18, C2C 37.97 (PGR 51.01%)",
          ours=_ours_longbench, paper_profile_reproduces=True,
          note="as Table 5 (notebook 18); the Average counts every held-out item once"),
    Entry("Table 12", "Training cost vs accuracy at checkpoints", "15_training_cost",
          _both("{results}/training_cost"), _figure("training_cost"),
          paper="Qwen2.5-0.5B+Qwen3-0.6B: 35.53 (step 0), 44.30 at step 300 (0.87 h, 8 GPUs), 42.92 final (5.59 h)",
          ours=_ours_checkpoints, paper_profile_reproduces=True),
    Entry("Table 13", "One receiver, two sharers", "16_model_pairs", _both("{results}/two_sharers"), _figure("two_sharers"),
          paper="Sharer1 -> R 60.71, Sharer2 -> R 46.13, both 64.60", ours=_ours_two_sharers,
          note="two pairs' separately trained fusers fused in together at inference (params pair_combination)"),
    Entry("Table 14", "Shared latent projectors", "19_latent_projectors", _both("{results}/latent_projectors"),
          _figure("latent_projectors"), paper="Qwen3-0.6B: none 34.78, Coder-0.5B 46.07, 4B-Base 51.23, both 51.08",
          ours=_ours_latent, paper_profile_reproduces=True,
          note="c2c.latent: linear sharer projectors into one latent space, one fuser per receiver with a gate per "
               "pair, trained jointly (receivers' losses summed); several sharers' terms are summed (our reading); "
               "the paper's second sharer is ambiguous (Qwen3-4B-Base in the table, used here; Qwen2.5-Math-1.5B in "
               "the text)"),
    Entry("Table 15", "GSM8K agentic workflow (T-C2C)", "17_gsm8k_workflow", _both("{results}/gsm8k_workflow"),
          _figure("gsm8k_workflow"), paper="single 41.17, T2T 61.18, C2C 62.55, T-C2C 78.01", ours=_ours_workflow,
          note="the paper prints neither its interpreter model, its fuser's data nor its prompts and caps: ours are "
               "c2c.workflow's, with notebook 03's fuser (params workflow_fuser)"),
    Entry("Figure 1", "T2T vs C2C paradigms", kind="schematic"),
    Entry("Figure 2", "Coder-Writer illustration", kind="schematic"),
    Entry("Figure 3", "t-SNE of source, target and transformed KV", "06_tsne",
          _both("{results}/cache_transformation"), _figure("tsne_keys"),
          paper="transformed points inside the target cloud (no numbers)", ours=_ours_tsne,
          paper_profile_reproduces=True),
    Entry("Figure 4", "Enriching the best / worst k layers", "02_layer_enrichment",
          _both("{results}/layer_enrichment_sets"), _figure("layer_enrichment_best_worst"),
          paper="Top-K rises to about all-layer Oracle (62.34) near k = 5; Last-K falls", ours=_ours_best_worst),
    Entry("Figure 5", "Fuser architecture", kind="schematic"),
    Entry("Figure 6", "Gain vs sharer size", "16_model_pairs", _both("{results}/model_pairs"),
          _figure("model_pairs_gain"), paper="C2C's gain grows faster with sharer size than T2T's (no values)",
          ours=_ours_sizes, note="sharer size as non-embedding parameters; the profile's pairs, one curve per receiver"),
    Entry("Figure 7", "Venn diagrams of correctly answered items", "12_answer_overlap",
          _both("{results}/answer_overlap"), _figure("answer_overlap"),
          paper="C2C-C right on 50.97% (Math-1.5B) / 72.11% (Qwen3-4B) of the sharer-right questions",
          ours=_ours_overlap),
    Entry("Figure 8", "MMLU per-subcategory accuracy (radar)", "13_mmlu_subcategories",
          _both("{results}/mmlu_subcategories"), _figure("mmlu_subcategories_radar"),
          paper="17 subcategories; Receiver, Sharer, T2T, C2C (no values)", paper_profile_reproduces=True),
    Entry("Figure 9", "Per-subcategory gain, Qwen2.5-0.5B -> Qwen3-0.6B", "13_mmlu_subcategories",
          _both("{results}/mmlu_subcategory_gain"), _figure("mmlu_subcategory_gain"),
          paper="C2C above T2T in 12 of 17; +7 history, +7.6 law, +7.5 chemistry over T2T",
          ours=_ours_subcategories, paper_profile_reproduces=True),
    Entry("Figure 10", "Per-subcategory gain, Qwen3-4B -> Qwen3-0.6B", "13_mmlu_subcategories",
          _both("{results}/mmlu_subcategory_gain"), _figure("mmlu_subcategory_gain"),
          paper="C2C above T2T in all 17; engineering: T2T -1%, C2C +24%", ours=_ours_subcategories),
    Entry("Figure 11", "Accuracy vs share of fused cache (former / latter)", "14_fused_fraction",
          _both("{results}/fused_fraction"), _figure("fused_fraction"),
          paper="first drops, then rises past 50%; latter moves more (no values)", ours=_ours_fraction),
    Entry("Figure 12", "Effective rank per layer", "10_effective_rank",
          _both("{results}/effective_rank_layers"), _figure("effective_rank"),
          paper="V rank rises after fusion, most in shallow layers; K about the same, up in deep layers"),
    Entry("Figure 13", "Training and validation loss", "15_training_cost",
          _both("{results}/loss_curves"), _figure("loss_curves"),
          paper="training loss converges by ~step 250; validation stable from ~step 1000", ours=_ours_curves,
          paper_profile_reproduces=True),
    Entry("Appendix A.4.2", "Gate statistics (no table in the paper)", "10_effective_rank",
          _both("{results}/gate_statistics") + _both("{results}/dynamic_weights"), _figure("dynamic_weights"),
          paper=">98.21% of gates open after general training, 52.67% after MMLU-auxiliary training",
          ours=_ours_gates, paper_profile_reproduces=True),
)


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def build_index(profile: str, eval_out: str, root: str | os.PathLike) -> list[dict]:
    """One row per entry: item, title, notebook, status, reason, the results and figures that exist, paper, ours."""
    root = Path(root)
    places = {"results": f"results/{profile}", "figures": f"figures/{profile}", "eval_out": eval_out.rstrip("/")}
    rows = []
    for entry in ENTRIES:
        results = [template.format(**places) for template in entry.results]
        figures = [template.format(**places) for template in entry.figures]
        missing = [f for f in results + figures if not (root / f).is_file()]
        note = not_run_note(profile, entry.notebook, root)
        if entry.kind == "schematic":
            status, reason = "schematic", "nothing to compute"
        elif missing and note.is_file():
            status, reason = "not run", f"not run in the {profile} profile: {note.read_text(encoding='utf-8').strip()}"
        elif missing:
            status, reason = "not run", f"not produced yet: {', '.join(missing)} (run notebook {entry.notebook})"
        else:
            status = "reproduced" if profile == "paper" and entry.paper_profile_reproduces else "stand-in"
            reason = ""
        ours = entry.ours(_read_csv(root / results[0])) if status in ("reproduced", "stand-in") and entry.ours else ""
        rows.append({"item": entry.item, "title": entry.title, "notebook": entry.notebook or "", "status": status,
                     "reason": reason or entry.note, "results": " ".join(f for f in results if f not in missing),
                     "figures": " ".join(f for f in figures if f not in missing), "paper": entry.paper, "ours": ours})
    return rows


def write_index(rows: list[dict], folder: str | os.PathLike) -> tuple[Path, Path]:
    """results/<profile>/paper_index.csv and .md."""
    return write_table(rows, Path(folder) / "paper_index")
