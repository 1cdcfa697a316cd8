"""The evaluator: the tiny main table, resume after a crash, parse failures, fail-loud errors, the CLI."""

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from c2c.benchmarks import extract_answer, load_benchmark, mc_prompt, write_tiny_fixtures
from c2c.eval_config import load_eval_config
from c2c.evaluate import EvaluationError, _Models, build_method, evaluate, main, read_records, run_eval, table_from_records
from c2c.main_table import BenchmarkResult, EvalReport
from c2c.mcmix import HELD_OUT_BENCHMARK, load_mc_mix_held_out
from c2c.methods import Answer, Method, ReceiverAlone
from c2c.paths import REPO_ROOT, repo_path, repo_relative
from c2c.routing import ROUTING_LABEL, route
from conftest import make_fuser

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "eval_tiny.yaml"
BENCHMARKS = ["mmlu-redux", "arc-challenge", "openbookqa", "ceval"]
TINY_N = {"mmlu-redux": 7, "arc-challenge": 9, "openbookqa": 8, "ceval": 8}  # after the rules' drops


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return write_tiny_fixtures(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture(scope="module")
def arc(fixtures):
    return list(load_benchmark("arc-challenge", fixtures["arc-challenge"]))


class Scripted(Method):
    """Replies with a fixed text per item (default: the gold), optionally raising on some items."""

    name = "scripted"

    def __init__(self, texts=None, fail_on=(), **options):
        self.texts, self.fail_on, self.seen = dict(texts or {}), set(fail_on), []
        super().__init__(**options)

    def _answer_batch(self, items):
        self.seen += [i.id for i in items]
        for item in items:
            if item.id in self.fail_on:
                raise RuntimeError("injected failure")
        texts = [self.texts.get(i.id, f"The correct answer is {i.answer}.") for i in items]
        return [Answer(i.id, extract_answer(t, len(i.options)), t) for i, t in zip(items, texts)]


# ------------------------------------------------------------------------------------ the main table


def test_tiny_config_gives_a_complete_main_table(tmp_path):
    report = run_eval(TINY_CONFIG, tmp_path, progress=False)
    rows = list(csv.DictReader((tmp_path / "main_table.csv").open()))
    assert [r["method"] for r in rows] == ["receiver_generate", "sharer_generate", "t2t_generate",
                                           "c2c_generate", "c2c_logits"]
    for row in rows:
        for b in BENCHMARKS:
            assert int(row[f"{b}_n"]) == TINY_N[b]
            assert 0 <= float(row[b]) <= 100
            assert 0 <= int(row[f"{b}_parse_failures"]) <= TINY_N[b]
            assert float(row[f"{b}_items_per_s"]) > 0
        assert float(row["average"]) == pytest.approx(sum(float(row[b]) for b in BENCHMARKS) / 4, abs=0.01)
    assert all(int(rows[-1][f"{b}_parse_failures"]) == 0 for b in BENCHMARKS)  # logits never fail to parse
    # the numbers are the per-item records'
    for (key, bench), result in report.results.items():
        records = read_records(tmp_path / "eval" / key / f"{bench}.jsonl")
        assert len(records) == TINY_N[bench]
        assert result.correct == sum(r["pred"] == r["gold"] for r in records)
        assert result.parse_failures == sum(r["pred"] is None for r in records)
    md = (tmp_path / "main_table.md").read_text()
    for title in ["MMLU-Redux", "ARC-C", "OpenBookQA", "C-Eval", "Average", "Receiver alone", "Sharer alone",
                  "T2T", "C2C", "N=7", "parse failures"]:
        assert title in md
    # the exact config is saved, and it reproduces the same checked config
    saved = yaml.safe_load((tmp_path / "eval_config.yaml").read_text())
    assert load_eval_config(saved)["methods"] == load_eval_config({**saved, "methods": saved["methods"]})["methods"]
    assert saved["output"] == str(tmp_path) and saved["receiver"] == "tiny-receiver"
    assert json.loads((tmp_path / "main_table.json").read_text())["table"][0]["method"] == "receiver_generate"

    # a second run resumes everything from disk: no method is run again, same table
    again = run_eval(TINY_CONFIG, tmp_path, progress=False)
    assert again.rows() == report.rows()


# ------------------------------------------------------------------------------------ resume


def test_resume_after_a_crash_gives_the_same_results(tmp_path, arc, tiny_receiver):
    model, tokenizer = tiny_receiver
    reference = evaluate(ReceiverAlone(model, tokenizer, scoring="logits"), arc, tmp_path / "ref",
                         batch_size=2, progress=False)

    class Crashing(ReceiverAlone):  # the real method, killed at its third batch
        calls = 0

        def _answer_batch(self, items):
            Crashing.calls += 1
            if Crashing.calls == 3:
                raise KeyboardInterrupt  # like a kill: not an Exception, nothing is retried
            return super()._answer_batch(items)

    with pytest.raises(KeyboardInterrupt):
        evaluate(Crashing(model, tokenizer, scoring="logits"), arc, tmp_path / "run", batch_size=2, progress=False)
    partial = read_records(tmp_path / "run" / "arc-challenge.jsonl")
    assert len(partial) == 4  # two batches made it to disk

    class Counting(ReceiverAlone):
        seen = []

        def _answer_batch(self, items):
            Counting.seen += [i.id for i in items]
            return super()._answer_batch(items)

    resumed = evaluate(Counting(model, tokenizer, scoring="logits"), arc, tmp_path / "run", batch_size=2,
                       progress=False)
    assert sorted(Counting.seen) == sorted({i.id for i in arc} - {r["id"] for r in partial})  # only the rest
    records = read_records(tmp_path / "run" / "arc-challenge.jsonl")
    assert len(records) == len({r["id"] for r in records}) == len(arc)  # no duplicates
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(resumed.records) == strip(reference.records)
    assert [r["id"] for r in resumed.records] == [i.id for i in arc]  # item order, whatever the run order


def test_a_torn_last_line_is_dropped_and_redone(tmp_path, arc):
    first = evaluate(Scripted(), arc, tmp_path, batch_size=4, progress=False)
    path = tmp_path / "arc-challenge.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:5]) + lines[5][:30])  # a crash in the middle of a write
    method = Scripted()
    second = evaluate(method, arc, tmp_path, batch_size=4, progress=False)
    assert sorted(method.seen) == sorted(json.loads(x)["id"] for x in lines[5:])  # the torn one and after
    assert [r["pred"] for r in second.records] == [r["pred"] for r in first.records]
    assert len(read_records(path)) == len(arc)


def test_a_corrupt_middle_line_stops_the_run(tmp_path, arc):
    evaluate(Scripted(), arc, tmp_path, batch_size=4, progress=False)
    path = tmp_path / "arc-challenge.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "{not json\n" + "".join(lines[1:]))
    with pytest.raises(ValueError, match="arc-challenge.jsonl:2: corrupt"):
        evaluate(Scripted(), arc, tmp_path, progress=False)


def test_results_of_another_setup_are_never_mixed_in(tmp_path, arc):
    evaluate(Scripted(max_new_tokens=64), arc[:3], tmp_path, progress=False)
    with pytest.raises(ValueError, match="different setup.*max_new_tokens"):
        evaluate(Scripted(max_new_tokens=32), arc, tmp_path, progress=False)
    with pytest.raises(ValueError, match="different setup.*benchmark"):
        evaluate(Scripted(max_new_tokens=64), arc, tmp_path, source={"name": "arc-challenge", "split": "validation"},
                 progress=False)


# ------------------------------------------------------------------------------------ fail loud


def test_parse_failures_count_as_wrong_and_are_reported(tmp_path, arc):
    texts = {arc[0].id: "I am not sure.", arc[1].id: "", arc[2].id: f"Answer: {arc[2].answer}",
             arc[3].id: "The correct answer is (A)."}
    result = evaluate(Scripted(texts), arc, tmp_path, batch_size=3, progress=False)
    assert result.n == len(arc) and result.parse_failures == 2
    assert result.correct == len(arc) - 2 - (arc[3].answer != "A")
    assert result.accuracy == result.correct / len(arc)  # the failures stay in the denominator
    assert [e["id"] for e in result.parse_failure_examples] == [arc[0].id, arc[1].id]
    failed = [r for r in result.records if r["parse_failure"]]
    assert all(r["pred"] is None and r["correct"] is False for r in failed)


def test_an_item_that_raises_is_counted_wrong_recorded_and_reported(tmp_path, arc):
    bad = arc[5].id
    method = Scripted(fail_on={bad})
    result = evaluate(method, arc, tmp_path, batch_size=4, progress=False)
    assert result.n == len(arc) and result.errors == 1 and result.correct == len(arc) - 1
    assert result.accuracy == (len(arc) - 1) / len(arc)  # in the denominator, counted wrong
    record = next(r for r in result.records if r["id"] == bad)
    assert (record["pred"], record["correct"], record["parse_failure"]) == (None, False, False)
    assert record["error"] == "RuntimeError: injected failure"
    assert all(not r.get("error") and r["correct"] for r in result.records if r["id"] != bad)
    # the batch that raised was answered again item by item: only its items were seen twice
    twice = {i for i in method.seen if method.seen.count(i) == 2}
    assert bad in twice and len(twice) == 4 and len(method.seen) == len(arc) + 4
    assert result.error_examples == [{"id": bad, "error": "RuntimeError: injected failure"}]
    assert result.summary()["errors"] == 1

    cfg = load_eval_config({"receiver": "tiny-receiver", "sharer": "tiny-sharer", "methods": ["receiver"],
                       "benchmarks": [{"name": "arc-challenge", "source": "tiny-fixtures"}]})
    entry = {**cfg["methods"][0], "label": "Scripted"}
    report = EvalReport(cfg, tmp_path, [entry], ["arc-challenge"], {(entry["key"], "arc-challenge"): result})
    assert report.rows()[0]["arc-challenge_errors"] == 1
    table = report.markdown()
    assert f"N={len(arc)}, parse failures 0, errors 1," in table
    assert f"- Scripted / arc-challenge: 1 of {len(arc)} — `{bad}`: \"RuntimeError: injected failure\"" in table

    # resume: the error record is not reused, the item is retried (and the file keeps one record per id)
    again = Scripted()
    result = evaluate(again, arc, tmp_path, batch_size=4, progress=False)
    assert again.seen == [bad] and result.errors == 0 and result.correct == len(arc)
    assert sorted(r["id"] for r in read_records(tmp_path / "arc-challenge.jsonl")) == sorted(i.id for i in arc)


def test_the_table_shows_the_first_parse_failures_of_each_method(tmp_path):
    cfg = load_eval_config({"receiver": "tiny-receiver", "methods": ["receiver"], "benchmarks": ["arc-challenge"]})
    records = [{"id": f"q{i}", "correct": False, "parse_failure": i < 5, "text": f"no letter {i}", "seconds": 1.0}
               for i in range(6)]
    entry = {**cfg["methods"][0], "label": "R"}
    result = BenchmarkResult(entry["key"], "R", "arc-challenge", records)
    table = EvalReport(cfg, tmp_path, [entry], ["arc-challenge"], {(entry["key"], "arc-challenge"): result}).markdown()
    assert "\nParse failure examples (first few per benchmark):\n" in table
    assert '\n- R / arc-challenge: 5 of 6 — `q0`: "no letter 0"; `q1`: "no letter 1"; `q2`: "no letter 2"\n' in table
    assert "Items that raised" not in table  # none raised


def many(arc, n):
    """n items (copies of the tiny ARC items under new ids; their order of running is longest prompt first)."""
    return [dataclasses.replace(arc[i % len(arc)], id=f"item-{i:03d}") for i in range(n)]


def run_order(items):
    return [i.id for i in sorted(items, key=lambda i: -len(mc_prompt(i)))]


def test_systematic_failures_stop_the_run(tmp_path, arc):
    # every item raises: stops once the first 20 ran (all of them when there are fewer), naming them
    items = many(arc, 40)
    with pytest.raises(EvaluationError, match=r"the first 20 items all raised: items \['item-.*RuntimeError: injected"):
        evaluate(Scripted(fail_on={i.id for i in items}), items, tmp_path / "all", batch_size=8, progress=False)
    assert len(read_records(tmp_path / "all" / "arc-challenge.jsonl")) == 24  # three batches of 8, kept
    with pytest.raises(EvaluationError, match=f"the first {len(arc)} items all raised"):
        evaluate(Scripted(fail_on={i.id for i in arc}), arc, tmp_path / "few", batch_size=4, progress=False)
    # the first 19 raise, the 20th does not: not systematic by that rule (and fewer than 100 ran)
    result = evaluate(Scripted(fail_on=set(run_order(items)[:19])), items, tmp_path / "19", batch_size=5,
                      progress=False)
    assert result.n == 40 and result.errors == 19
    # more than 1% once 100 ran: 2 of 150 stop the run, 1 of 150 does not
    items = many(arc, 150)
    order = run_order(items)
    with pytest.raises(EvaluationError, match=r"2 of 1\d\d items raised \(more than 1%\)"):
        evaluate(Scripted(fail_on={order[3], order[60]}), items, tmp_path / "two", batch_size=10, progress=False)
    result = evaluate(Scripted(fail_on={order[3]}), items, tmp_path / "one", batch_size=10, progress=False)
    assert result.n == 150 and result.errors == 1


def test_batched_evaluation_equals_batch_one(tmp_path, arc, tiny_receiver):
    method = ReceiverAlone(*tiny_receiver, scoring="generate", max_new_tokens=6)
    batched = evaluate(method, arc, tmp_path / "b4", batch_size=4, progress=False)
    single = evaluate(method, arc, tmp_path / "b1", batch_size=1, progress=False)
    assert [(r["pred"], r["text"]) for r in batched.records] == [(r["pred"], r["text"]) for r in single.records]


# ------------------------------------------------------------------------------------ configs and the CLI


def test_config_errors_are_clear(tmp_path):
    base = {"receiver": "tiny-receiver", "sharer": "tiny-sharer", "methods": ["receiver"],
            "benchmarks": [{"name": "arc-challenge", "source": "tiny-fixtures"}]}
    with pytest.raises(ValueError, match="unknown method 'majority'; known: receiver, sharer, t2t, c2c"):
        load_eval_config({**base, "methods": ["majority"]})
    with pytest.raises(ValueError, match="unknown benchmark 'gsm8k'"):
        load_eval_config({**base, "benchmarks": ["gsm8k"]})
    with pytest.raises(ValueError, match="unknown config keys \\['recevier'\\]"):
        load_eval_config({**base, "recevier": "x"})
    with pytest.raises(ValueError, match="'c2c' needs config keys \\['fuser'\\]"):
        load_eval_config({**base, "methods": ["c2c"]})
    with pytest.raises(ValueError, match="scoring"):
        load_eval_config({**base, "scoring": "vote"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_eval({**base, "benchmarks": [{"name": "arc-challenge", "source": str(tmp_path / "missing.jsonl")}]},
                 tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="config file"):
        load_eval_config(tmp_path / "nope.yaml")


def test_static_cache_setting_reaches_every_method():
    base = {"receiver": "tiny-receiver", "sharer": "tiny-sharer", "methods": ["receiver", "sharer", "t2t", "c2c"],
            "fuser": {"random": {"seed": 0, "hidden_dim": 32, "intermediate_dim": 24}},
            "benchmarks": [{"name": "arc-challenge", "source": "tiny-fixtures"}]}
    assert load_eval_config(base)["static_cache"] == "auto"
    models = _Models(load_eval_config(base))
    for value, expected in (("auto", None), (True, True), (False, False)):
        cfg = load_eval_config({**base, "static_cache": value})
        assert [build_method(entry, cfg, models).static_cache for entry in cfg["methods"]] == [expected] * 4
    with pytest.raises(ValueError, match="static_cache must be one of \\['auto', True, False\\], got 'yes'"):
        load_eval_config({**base, "static_cache": "yes"})


def test_alignment_defaults_to_the_fusers_own(tmp_path, tiny_receiver, tiny_sharer):
    fuser = make_fuser(tiny_receiver[0], tiny_sharer[0], alignment="first")
    fuser.save_pretrained(tmp_path / "fuser")
    base = {"receiver": "tiny-receiver", "sharer": "tiny-sharer", "methods": ["c2c"],
            "fuser": {"checkpoint": str(tmp_path / "fuser")},
            "benchmarks": [{"name": "arc-challenge", "source": "tiny-fixtures"}]}
    cfg = load_eval_config(base)
    assert cfg["alignment"] is None
    models = _Models(cfg)
    assert build_method(cfg["methods"][0], cfg, models).describe()["alignment"] == ["first"]
    cfg = load_eval_config({**base, "alignment": "longest"})
    with pytest.raises(ValueError, match="trained with token alignment 'first', not 'longest'"):
        build_method(cfg["methods"][0], cfg, models)


def test_cli(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--config", str(TINY_CONFIG), "--out", str(out), "--methods", "receiver,c2c_logits",
               "--benchmarks", "arc-challenge", "--limit", "5", "--no-progress"])
    assert rc == 0
    rows = list(csv.DictReader((out / "main_table.csv").open()))
    assert [r["method"] for r in rows] == ["receiver_generate", "c2c_logits"]
    assert rows[0]["arc-challenge_n"] == "5" and "ceval" not in rows[0]
    saved = (out / "eval_config.yaml").read_text()
    assert "# command: python -m c2c.evaluate --config" in saved and "limit: 5" in saved
    assert "--limit 5" in (out / "main_table.md").read_text()
    assert main(["--config", str(TINY_CONFIG), "--out", str(out), "--benchmarks", "gsm8k"]) == 1
    assert "not in the config" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("eval_*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load_eval_config(path)
    assert cfg["methods"] and cfg["benchmarks"]
    if path.name == "eval_paper.yaml":
        assert (cfg["receiver"], cfg["sharer"]) == ("Qwen/Qwen3-0.6B", "Qwen/Qwen2.5-0.5B-Instruct")
        assert cfg["fuser"]["checkpoint"].endswith("qwen3_0.6b+qwen2.5_0.5b_Fuser/final")
        assert [b["name"] for b in cfg["benchmarks"]] == BENCHMARKS and all(b["source"] is None for b in cfg["benchmarks"])
        assert {m["name"] for m in cfg["methods"]} == {"receiver", "sharer", "t2t", "c2c"}
        assert (cfg["max_new_tokens"], cfg["sharer_max_new_tokens"], cfg["t2t_protocol"]) == (64, 256, "sentence")  # v2


# ------------------------------------------------------------------------------------ controls, prompt caches, statistics


def _control_config(fuser_folder, identical_folder, **overrides) -> dict:
    """Receiver, sharer, C2C and the Identical control (its sharer: the receiver itself), letter scoring."""
    return {"name": "controls", "receiver": "tiny-receiver", "sharer": "tiny-sharer", "dtype": "float32",
            "device": "cpu", "scoring": "logits", "batch_size": 3, "fuser": {"checkpoint": str(fuser_folder)},
            "methods": ["receiver", "sharer", "c2c",
                        {"name": "c2c", "key": "c2c_identical", "label": "C2C, Identical control",
                         "sharer": "tiny-receiver", "fuser": {"checkpoint": str(identical_folder)}}],
            "benchmarks": [{"name": "arc-challenge", "source": "tiny-fixtures"},
                           {"name": "openbookqa", "source": "tiny-fixtures"}],
            "comparisons": [["c2c_logits", "receiver_logits"], ["c2c_logits", "c2c_identical"]], **overrides}


def test_identical_control_prompt_caches_and_paired_statistics(tmp_path, tiny_receiver, tiny_sharer):
    (receiver, _), (sharer, _) = tiny_receiver, tiny_sharer
    make_fuser(receiver, sharer, seed=1, gate_logit=1.0).save_pretrained(tmp_path / "fuser")
    make_fuser(receiver, receiver, seed=2, gate_logit=1.0).save_pretrained(tmp_path / "identical")
    online = run_eval(_control_config(tmp_path / "fuser", tmp_path / "identical"), tmp_path / "online", progress=False)
    cached = run_eval(_control_config(tmp_path / "fuser", tmp_path / "identical", prefix_cache=True),
                      tmp_path / "cached", progress=False)
    # prompt caches read from disk give the same answers and letter log-probabilities as computing them
    for key, result in online.results.items():
        for a, b in zip(result.records, cached.results[key].records):
            assert (a["id"], a["pred"]) == (b["id"], b["pred"])
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    # the Identical control really used the receiver as its sharer (another answer than C2C's, same receiver)
    models = _Models(load_eval_config(_control_config(tmp_path / "fuser", tmp_path / "identical")))
    entry = load_eval_config(_control_config(tmp_path / "fuser", tmp_path / "identical"))["methods"][3]
    identical = build_method(entry, load_eval_config(_control_config(tmp_path / "fuser", tmp_path / "identical")), models)
    assert identical.model.sharers[0] is identical.model.receiver
    assert json.loads((tmp_path / "online" / "eval" / "c2c_identical" / "arc-challenge.meta.json").read_text())
    # paired statistics from the per-item records, recomputed by hand
    rows = {(c["a"], c["b"], c["benchmark"]): c for c in online.comparisons()}
    assert len(rows) == 4
    for (a, b, bench), row in rows.items():
        ra = {r["id"]: r["correct"] for r in online.results[(a, bench)].records}
        rb = {r["id"]: r["correct"] for r in online.results[(b, bench)].records}
        assert row["n"] == len(ra) == len(rb)
        assert row["a_only"] == sum(ra[i] and not rb[i] for i in ra)
        assert row["b_only"] == sum(rb[i] and not ra[i] for i in ra)
        assert row["difference"] == pytest.approx(100 * (sum(ra.values()) - sum(rb.values())) / len(ra), abs=0.01)
        assert 0 < row["mcnemar_p"] <= 1
    gaps = {g["method"]: g for g in online.gap_recovered()}
    assert set(gaps) == {"c2c_logits", "c2c_identical"}
    table = online.rows()
    for bench in ("arc-challenge", "openbookqa"):
        receiver_acc, sharer_acc, c2c_acc = (r[bench] for r in table[:3])
        expected = None if sharer_acc == receiver_acc else 100 * (c2c_acc - receiver_acc) / (sharer_acc - receiver_acc)
        assert gaps["c2c_logits"][bench] == (None if expected is None else pytest.approx(expected, abs=0.2))
        assert table[0][f"{bench}_ci95_low"] <= table[0][bench] <= table[0][f"{bench}_ci95_high"]
    md = (tmp_path / "online" / "main_table.md").read_text()
    assert "C2C, Identical control" in md and "McNemar" in md and "PGR" in md and "[" in md
    with pytest.raises(ValueError, match="comparisons name methods \\['t2t_logits'\\]"):
        load_eval_config(_control_config(tmp_path, tmp_path, comparisons=[["t2t_logits", "receiver_logits"]]))
    with pytest.raises(ValueError, match="per method for c2c only"):
        load_eval_config(_control_config(tmp_path, tmp_path, methods=[{"name": "receiver", "sharer": "tiny-receiver"}]))


def test_the_table_rebuilt_from_records_equals_the_run_and_adds_the_routing_row(tmp_path, tiny_receiver,
                                                                                tiny_sharer):
    (receiver, _), (sharer, _) = tiny_receiver, tiny_sharer
    make_fuser(receiver, sharer, seed=1, gate_logit=1.0).save_pretrained(tmp_path / "fuser")
    make_fuser(receiver, receiver, seed=2, gate_logit=1.0).save_pretrained(tmp_path / "identical")
    config = _control_config(tmp_path / "fuser", tmp_path / "identical", routing=True,
                             comparisons=[["c2c_logits", "routing"], ["c2c_logits", "receiver_logits"]])
    ran = run_eval(config, tmp_path / "out", progress=False)
    # the routing row: c2c.routing on the receiver's and sharer's records, as a method of the table
    assert [m["key"] for m in ran.methods][-1] == "routing" and ran.methods[-1]["label"] == ROUTING_LABEL
    for bench in ("arc-challenge", "openbookqa"):
        expected = route(ran.results[("receiver_logits", bench)].records, ran.results[("sharer_logits", bench)].records)
        assert ran.results[("routing", bench)].records == expected
    assert {(c["a"], c["b"]) for c in ran.comparisons()} == {("c2c_logits", "routing"), ("c2c_logits", "receiver_logits")}
    assert "Routing" in (tmp_path / "out" / "main_table.md").read_text()
    table = (tmp_path / "out" / "main_table.md").read_text()

    # rebuilt from the records with no model loaded (the fusers are gone: run_eval would refuse to start)
    for folder in ("fuser", "identical"):
        for file in (tmp_path / folder).iterdir():
            file.unlink()
    rebuilt = table_from_records(config, tmp_path / "out", command=ran.command)
    assert rebuilt.rows() == ran.rows() and rebuilt.comparisons() == ran.comparisons()
    assert [m["label"] for m in rebuilt.methods] == [m["label"] for m in ran.methods]  # labels as the methods' own
    assert (tmp_path / "out" / "main_table.md").read_text() == table
    with pytest.raises(FileNotFoundError, match="fuser checkpoint"):
        run_eval(config, tmp_path / "out", progress=False)

    # a method with no records is a "-" row; records of part of the items, or under other code, are refused
    (tmp_path / "out" / "eval" / "c2c_identical" / "openbookqa.jsonl").unlink()
    partial = table_from_records(config, tmp_path / "out")
    assert partial.rows()[3]["openbookqa"] is None and partial.rows()[3]["arc-challenge"] is not None
    path = tmp_path / "out" / "eval" / "c2c_logits" / "arc-challenge.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))
    with pytest.raises(ValueError, match="1 of 9 items have no record yet"):
        table_from_records(config, tmp_path / "out")
    path.write_text("".join(lines))
    meta = path.with_name("arc-challenge.meta.json")
    meta.write_text(meta.read_text().replace(json.loads(meta.read_text())["fingerprints"]["code"], "0" * 16))
    with pytest.raises(ValueError, match="different setup \\(code: recorded '0000000000000000'"):
        table_from_records(config, tmp_path / "out")
    with pytest.raises(ValueError, match="routing: true needs methods named receiver and sharer"):
        load_eval_config({**config, "methods": ["receiver", "c2c"], "comparisons": []})
    # the receiver routed (and checked) is the first of its name, as the table's PGR reads it
    two = [{"name": "receiver", "key": "r_logits"}, {"name": "receiver", "key": "r_generate", "scoring": "generate"},
           "sharer"]
    load_eval_config({**config, "methods": two, "comparisons": []})
    with pytest.raises(ValueError, match="needs the receiver and sharer scored with scoring: logits"):
        load_eval_config({**config, "methods": [two[1], two[0], "sharer"], "comparisons": []})


def test_selecting_a_method_by_key_does_not_select_others_of_its_name(tmp_path, tiny_receiver, tiny_sharer):
    make_fuser(tiny_receiver[0], tiny_sharer[0], seed=1).save_pretrained(tmp_path / "fuser")
    config = _control_config(tmp_path / "fuser", tmp_path / "not-trained-yet")
    config["methods"][2] = {"name": "c2c", "key": "c2c"}
    config["comparisons"] = [["c2c", "receiver_logits"]]
    report = run_eval(config, tmp_path / "out", methods=["c2c"], benchmarks=["arc-challenge"], progress=False)
    assert [m["key"] for m in report.methods] == ["c2c"]  # not the Identical control (its fuser is missing)
    by_name = load_eval_config({**config, "methods": config["methods"][:2] + [{"name": "c2c"}], "comparisons": []})
    assert [m["key"] for m in by_name["methods"]] == ["receiver_logits", "sharer_logits", "c2c_logits"]


def test_config_paths_are_repository_relative_whatever_the_working_folder(tmp_path, monkeypatch):
    """Notebooks run in notebooks/ (papermill), the CLI in the repository: a config's relative fuser folder means the
    same folder in both, and both record it alike (else one refuses the other's records as another setup)."""
    monkeypatch.chdir(tmp_path)
    assert repo_path("runs/small/f") == REPO_ROOT / "runs" / "small" / "f"
    assert repo_relative(REPO_ROOT / "runs" / "small" / "f") == repo_relative("runs/small/f") == "runs/small/f"
    assert repo_relative(tmp_path / "f") == str((tmp_path / "f").resolve())  # outside the repository: absolute
    base = {"receiver": "tiny-receiver", "sharer": "tiny-sharer",
            "benchmarks": [{"name": "arc-challenge", "source": "tiny-fixtures"}]}
    fusers = [load_eval_config({**base, "methods": [{"name": "c2c", "fuser": {"checkpoint": str(checkpoint)}}]})
              ["methods"][0]["fuser"] for checkpoint in (REPO_ROOT / "runs" / "small" / "f", "runs/small/f")]
    assert fusers == [{"checkpoint": "runs/small/f"}] * 2


def test_more_sharers_fuse_separately_trained_fusers_at_inference(tmp_path, tiny_receiver, tiny_sharer):
    """Table 13: a second sharer with its own fuser. With the second fuser's gates closed the method answers exactly
    as C2C with the first alone; open, it answers from both (and names both in its description)."""
    (receiver, _), (sharer, _) = tiny_receiver, tiny_sharer
    make_fuser(receiver, sharer, seed=1, gate_logit=1.0).save_pretrained(tmp_path / "fuser")
    make_fuser(receiver, receiver, seed=2, gate_logit=-1.0).save_pretrained(tmp_path / "closed")
    make_fuser(receiver, receiver, seed=2, gate_logit=1.0).save_pretrained(tmp_path / "open")

    def two(key, second, mode="sequential"):
        return {"name": "c2c", "key": key, "multi_sharer": mode,
                "more_sharers": [{"sharer": "tiny-receiver", "fuser": {"checkpoint": str(tmp_path / second)}}]}

    config = _control_config(tmp_path / "fuser", tmp_path / "open", benchmarks=[{"name": "arc-challenge",
                                                                                  "source": "tiny-fixtures"}],
                             comparisons=[], methods=["c2c", two("both_closed", "closed"), two("both_open", "open"),
                                                      two("both_parallel", "open", "parallel")])
    ran = run_eval(config, tmp_path / "out", progress=False)
    records = {key: ran.results[(key, "arc-challenge")].records
               for key in ("c2c_logits", "both_closed", "both_open", "both_parallel")}
    for one, closed in zip(records["c2c_logits"], records["both_closed"]):
        assert one["scores"] == closed["scores"]
    assert any(a["scores"] != b["scores"] for a, b in zip(records["c2c_logits"], records["both_open"]))
    meta = json.loads((tmp_path / "out" / "eval" / "both_parallel" / "arc-challenge.meta.json").read_text())
    assert meta["method"]["sharers"] == ["tiny-sharer", "tiny-receiver"] and meta["method"]["multi_sharer"] == "parallel"
    assert " + " in meta["method"]["fuser"]
    with pytest.raises(ValueError, match="more_sharers\\[0\\] must be"):
        load_eval_config({**config, "methods": [{"name": "c2c", "more_sharers": [{"sharer": "tiny-receiver"}]}]})
    with pytest.raises(ValueError, match="multi_sharer must be one of"):
        load_eval_config({**config, "methods": [{**two("x", "open"), "multi_sharer": "mean"}]})
    with pytest.raises(ValueError, match="per method for c2c only"):
        load_eval_config({**config, "methods": [{"name": "sharer", "multi_sharer": "parallel"}]})


def test_held_out_mix_items_are_evaluated_and_a_fuser_trained_on_them_is_refused(tmp_path, tiny_receiver, tiny_sharer):
    run = tmp_path / "run"
    make_fuser(tiny_receiver[0], tiny_sharer[0], seed=1, gate_logit=1.0).save_pretrained(run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"dataset": "offline:mc-mix", "max_examples": 2000}))
    config = {"receiver": "tiny-receiver", "sharer": "tiny-sharer", "scoring": "logits",
              "methods": [{"name": "receiver"}, {"name": "c2c", "fuser": {"checkpoint": str(run / "final")}}],
              "benchmarks": [{"name": HELD_OUT_BENCHMARK, "limit": 6}]}
    report = run_eval(config, tmp_path / "out", progress=False)
    result = report.results[("c2c_logits", HELD_OUT_BENCHMARK)]
    assert [r["id"] for r in result.records] == [i.id for i in load_mc_mix_held_out(6)]
    assert result.n == 6 and "MC mix, held out" in (tmp_path / "out" / "main_table.md").read_text()

    (run / "config.yaml").write_text(yaml.safe_dump({"dataset": "offline:mc-mix", "max_examples": None}))
    with pytest.raises(ValueError, match=r"trained on 6 of the 6 held-out MC-mix items .*lower mc-mix-held-out's"):
        run_eval(config, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="needs a limit"):
        load_eval_config({**config, "benchmarks": [HELD_OUT_BENCHMARK]})
    with pytest.raises(ValueError, match=r"takes no \['split'\]"):
        load_eval_config({**config, "benchmarks": [{"name": HELD_OUT_BENCHMARK, "limit": 6, "split": "test"}]})
