"""The reproduction index: every table and figure once, statuses from the files that exist, never a missing file."""

import re
from pathlib import Path

from c2c.oracle import write_table
from c2c.paper_index import (ENTRIES, _ours_ablation, _ours_latent, _ours_longbench, _ours_sources, build_index,
                             write_index)
from c2c.paths import record_not_run

ROOT = Path(__file__).resolve().parents[1]


def test_every_table_and_figure_of_the_paper_once():
    items = [e.item for e in ENTRIES]
    assert len(items) == len(set(items))
    paper = [f"Table {i}" for i in range(1, 16)] + [f"Figure {i}" for i in range(1, 14)]
    assert [i for i in items if re.match(r"(Table|Figure) \d+$", i)] == paper  # 28, in order
    for e in ENTRIES:
        assert e.kind in ("computed", "schematic"), e.item
        if e.kind == "computed":
            assert (ROOT / "notebooks" / f"{e.notebook}.ipynb").is_file(), e.item
            assert e.results and e.results[0].endswith(".csv") and e.figures, e.item
        else:
            assert not (e.results or e.figures or e.notebook), e.item


def test_status_follows_the_files(tmp_path):
    rows = {r["item"]: r for r in build_index("tiny", "results/tiny", tmp_path)}
    assert rows["Figure 1"]["status"] == "schematic" and rows["Table 14"]["status"] == "not run"
    assert "(run notebook 19_latent_projectors)" in rows["Table 14"]["reason"]
    table1 = rows["Table 1"]
    assert table1["status"] == "not run" and "results/tiny/oracle_cache_enrichment.csv" in table1["reason"]
    assert table1["results"] == table1["figures"] == ""  # never a file that is not there
    write_table([{"method": m, "accuracy": a} for m, a in (("direct", 0.5), ("few-shot", 0.625), ("oracle", 0.6))],
                tmp_path / "results/tiny/oracle_cache_enrichment")
    (tmp_path / "figures/tiny").mkdir(parents=True)
    (tmp_path / "figures/tiny/oracle_cache_enrichment.png").write_bytes(b"png")
    table1 = {r["item"]: r for r in build_index("tiny", "results/tiny", tmp_path)}["Table 1"]
    assert table1["status"] == "not run" and table1["reason"].startswith("not produced yet: "
                                                                         "figures/tiny/oracle_cache_enrichment.pdf")
    assert table1["results"] == "results/tiny/oracle_cache_enrichment.csv results/tiny/oracle_cache_enrichment.md"
    assert table1["figures"] == "figures/tiny/oracle_cache_enrichment.png" and table1["ours"] == ""
    (tmp_path / "figures/tiny/oracle_cache_enrichment.pdf").write_bytes(b"pdf")
    table1 = {r["item"]: r for r in build_index("tiny", "results/tiny", tmp_path)}["Table 1"]
    assert table1["status"] == "stand-in" and table1["reason"] == ""
    assert table1["ours"] == "direct 50.0, few-shot 62.5, oracle 60.0" and "58.42" in table1["paper"]
    # the paper profile: "reproduced" only where it runs the paper's own setup
    for profile_folder in ("results/paper", "figures/paper"):
        (tmp_path / profile_folder).mkdir(parents=True)
    for name in ("oracle_cache_enrichment.csv", "oracle_cache_enrichment.md"):
        (tmp_path / "results/paper" / name).write_text((tmp_path / "results/tiny" / name).read_text())
    for name in ("oracle_cache_enrichment.png", "oracle_cache_enrichment.pdf"):
        (tmp_path / "figures/paper" / name).write_bytes(b"x")
    assert {r["item"]: r for r in build_index("paper", "results/paper", tmp_path)}["Table 1"]["status"] == "stand-in"
    csv_path, md_path = write_index(build_index("tiny", "results/tiny", tmp_path), tmp_path / "results/tiny")
    assert csv_path.name == "paper_index.csv" and len(md_path.read_text().splitlines()) == 2 + len(ENTRIES)


def test_eval_out_places_the_main_table(tmp_path):
    rows = {r["item"]: r for r in build_index("small", "results/small/mc/", tmp_path)}
    assert "results/small/mc/main_table.csv" in rows["Table 4"]["reason"]


def test_the_ablation_row_reads_benchmark_accuracy_facts_or_loss_as_notebook_07_wrote_them():
    facts = [{"variant": "projection", "held_out_loss": "0.5", "answer_accuracy": "0.25"},
             {"variant": "full", "held_out_loss": "0.25", "answer_accuracy": "0.5"}]
    assert "held-out facts" in _ours_ablation(facts) and "50" in _ours_ablation(facts)
    general = [{"variant": "projection", "held_out_loss": "11.75"}, {"variant": "full", "held_out_loss": "11.5"}]
    assert _ours_ablation(general) == "projection 11.750, full 11.500 (held-out loss, nats/token)"
    arc = {"benchmark": "arc-challenge", "n": "1172", "receiver": "27.56", "sharer": "60.58"}
    mmlu = {"benchmark": "mmlu", "n": "1140", "receiver": "29.04", "sharer": "51.23"}
    benchmark = [{**arc, "variant": "projection", "c2c": "25.0"}, {**arc, "variant": "+ gate", "c2c": "39.85"},
                 {**mmlu, "variant": "+ fusion", "c2c": "45.09"}]
    assert _ours_ablation(benchmark) == (
        "arc-challenge: projection 25.0, + gate 39.9 (accuracy %, 1172 items; receiver 27.6, sharer 60.6); "
        "mmlu: + fusion 45.1 (accuracy %, 1140 items; receiver 29.0, sharer 51.2)")  # no variant on both: no mean
    benchmark.append({**mmlu, "variant": "projection", "c2c": "26.0"})
    assert _ours_ablation(benchmark).endswith("; mmlu: + fusion 45.1, projection 26.0 (accuracy %, 1140 items; "
                                              "receiver 29.0, sharer 51.2); mean of 2: projection 25.50")
    one_benchmark = [{k: v for k, v in row.items() if k != "benchmark"} for row in benchmark[:2]]  # before 2026-12-05
    assert _ours_ablation(one_benchmark) == "projection 25.0, + gate 39.9 (accuracy %, 1172 items; receiver 27.6, sharer 60.6)"


def test_the_table_6_row_names_each_of_single_identical_and_c2c_or_says_not_run():
    small = [{"method": "receiver", "average": "27.9"}, {"method": "c2c", "average": "41.2"},
             {"method": "c2c_identical", "average": "30.1"}]
    assert _ours_sources(small) == "Single not run, Identical 30.1, C2C 41.2 (average accuracy)"
    tiny = [{"method": "c2c_generate", "average": "20.0"}, {"method": "c2c_logits", "average": "25.0"},
            {"method": "single", "average": "22.5"}]
    assert _ours_sources(tiny) == "Single 22.5, Identical not run, C2C 20.0 (average accuracy)"


def test_a_notebook_that_does_not_run_in_a_profile_gives_its_reason(tmp_path):
    rows = {r["item"]: r for r in build_index("small", "results/small", tmp_path)}
    assert rows["Table 5"]["reason"].startswith("not produced yet: results/small/longbench_table5.csv")
    assert not record_not_run("small", "18_longbench", "  no LongBench offline\n", tmp_path)  # what notebook 18 calls
    assert (tmp_path / "results/small/not_run/18_longbench.txt").read_text() == "no LongBench offline\n"
    rows = {r["item"]: r for r in build_index("small", "results/small", tmp_path)}
    for item in ("Table 5", "Table 11"):
        assert rows[item]["status"] == "not run"
        assert rows[item]["reason"] == "not run in the small profile: no LongBench offline"
    assert rows["Table 1"]["reason"].startswith("not produced yet")  # another notebook's marker only
    assert record_not_run("small", "18_longbench", None, tmp_path)  # a profile that runs it removes the old reason
    rows = {r["item"]: r for r in build_index("small", "results/small", tmp_path)}
    assert rows["Table 5"]["reason"].startswith("not produced yet")


def test_the_longbench_rows_name_every_bucket():
    rows = [{"bucket": "0-4k", "receiver": "30.5", "t2t": "33.46", "c2c": "37.3"},
            {"bucket": "8k+", "receiver": "", "t2t": "", "c2c": ""}]
    assert _ours_longbench(rows) == ("0-4k: receiver 30.50, T2T 33.46, C2C 37.30; "
                                     "8k+: receiver -, T2T -, C2C -")


def test_the_latent_row_names_each_receiver_and_setting():
    rows = [{"sharers": "none", "r1": "34.5", "r1_low": "30", "r1_high": "39", "r1_n": "4", "r2": "38.0"},
            {"sharers": "all", "r1": "51.0", "r1_gain": "16.5", "r1_gain_p": "0.01", "r2": "59.75"}]
    assert _ours_latent(rows) == "r1: none 34.5, all 51.0; r2: none 38.0, all 59.8"


def test_every_file_of_the_index_is_a_product_of_its_notebook_or_a_stage_it_reads():
    """Each result and figure an index row names is declared in notebooks/stages.yaml by the row's notebook or an upstream
    of it (figures by their PNG), in every profile, so `make <file>` runs what writes it."""
    from c2c.config import load_profile

    for profile in ("tiny", "small", "paper"):
        stages = load_profile(ROOT / "params" / f"{profile}.yaml").stages
        places = {"results": f"results/{profile}", "figures": f"figures/{profile}",
                  "eval_out": stages["99_paper_index"].params["analysis_eval_out"]}
        for entry in (e for e in ENTRIES if e.kind == "computed"):
            stage = stages[entry.notebook]
            products = {path for name in (stage.name, *stage.after) for path in stages[name].products}
            for template in entry.results + entry.figures:
                path = template.format(**places).removesuffix(".pdf")
                path = path + ".png" if template.endswith(".pdf") else path
                assert path in products, f"{profile}: {entry.item} names {path}, not a product of {entry.notebook}"
