"""Per-phase timing: every phase of every method on the tiny pair, time attributed to the right phase."""

import time

import pytest
import torch

from c2c.benchmarks import load_benchmark, write_tiny_fixtures
from c2c.fused import PREFIX_STORE_ATTRIBUTE
from c2c.methods import C2C, chat_messages, render_ids
from c2c.phases import DecoderTimer, elapsed_ms, phase_table, phase_timing, time_per_query
from conftest import make_fuser

SLEEP_S = 0.05


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    folders = write_tiny_fixtures(tmp_path_factory.mktemp("fixtures"))
    return list(load_benchmark("arc-challenge", folders["arc-challenge"]))[:2]


@pytest.fixture
def c2c(tiny_receiver, tiny_sharer):
    (r, rt), (s, st) = tiny_receiver, tiny_sharer
    return C2C.from_models(r, rt, s, st, make_fuser(r, s, seed=3, gate_logit=1.0))


def test_elapsed_ms_and_distinct_decoders(tiny_receiver):
    result, ms = elapsed_ms(lambda: time.sleep(SLEEP_S) or 7, torch.device("cpu"))
    assert result == 7 and ms >= 1000 * SLEEP_S
    decoder = tiny_receiver[0].get_decoder()
    with pytest.raises(ValueError, match="distinct"):
        DecoderTimer({"receiver": decoder, "sharer": decoder}, torch.device("cpu"))


def test_every_phase_with_its_tokens(items, c2c, tiny_receiver, tiny_sharer):
    rows = phase_timing(c2c, items, max_new_tokens=5, sharer_max_new_tokens=7, warmup=1)
    assert [(r["method"], r["stage"]) for r in rows[:6]] == [("receiver", "receiver"), ("sharer", "sharer"),
                                                             ("t2t", "sharer"), ("t2t", "receiver"),
                                                             ("c2c", "sharer"), ("c2c", "receiver")]
    assert len(rows) == 6 * len(items)
    (_, rt), (_, st) = tiny_receiver, tiny_sharer
    for item in items:
        got = {(row["method"], row["stage"]): row for row in rows if row["item"] == item.id}
        prompt = len(render_ids(rt, chat_messages(item)))
        assert got[("receiver", "receiver")]["input_tokens"] == prompt == got[("c2c", "receiver")]["input_tokens"]
        assert got[("sharer", "sharer")]["input_tokens"] == len(render_ids(st, chat_messages(item)))
        assert 1 <= got[("t2t", "sharer")]["output_tokens"] <= 7
        for key in [("receiver", "receiver"), ("sharer", "sharer"), ("t2t", "receiver"), ("c2c", "receiver")]:
            assert 1 <= got[key]["output_tokens"] <= 5
        assert got[("t2t", "receiver")]["input_tokens"] > prompt  # the question with the sharer's text
        assert got[("c2c", "sharer")]["output_tokens"] == 0 and got[("c2c", "sharer")]["fusion_ms"] > 0
        for row in got.values():
            assert row["prefill_ms"] > 0 and row["decode_ms"] >= 0
    table = phase_table(rows)
    assert [(t["method"], t["stage"]) for t in table] == [("receiver", "receiver"), ("sharer", "sharer"),
                                                          ("t2t", "sharer"), ("t2t", "receiver"),
                                                          ("c2c", "sharer"), ("c2c", "receiver")]
    assert all(t["items"] == len(items) for t in table)


def test_time_goes_to_the_phase_that_spends_it(items, c2c, monkeypatch):
    """A slow fuser shows up as fusion, a slow sharer decoder as sharer prefill, nothing else."""
    model = c2c.model
    fuser, sharer_decoder = model.fusers[0], model.sharers[0].get_decoder()
    delta = fuser.delta
    monkeypatch.setattr(fuser, "delta", lambda *a, **k: (time.sleep(SLEEP_S), delta(*a, **k))[1])
    forward = sharer_decoder.forward
    monkeypatch.setattr(sharer_decoder, "forward", lambda *a, **k: (time.sleep(2 * SLEEP_S), forward(*a, **k))[1])
    rows = [r for r in phase_timing(c2c, items[:1], max_new_tokens=3, sharer_max_new_tokens=3, warmup=0)
            if r["method"] == "c2c"]
    sharer, receiver = rows
    assert 1000 * SLEEP_S <= sharer["fusion_ms"] < 1000 * 2 * SLEEP_S
    assert sharer["prefill_ms"] >= 2000 * SLEEP_S
    assert receiver["prefill_ms"] < 1000 * SLEEP_S


def test_a_prompt_cache_store_is_refused(items, c2c, monkeypatch):
    monkeypatch.setattr(c2c.model.receiver, PREFIX_STORE_ATTRIBUTE, object(), raising=False)
    with pytest.raises(ValueError, match="prefix_cache=False"):
        phase_timing(c2c, items)


def test_tables_take_medians_and_per_item_totals():
    def row(method, stage, item, prefill, decode, fusion=0.0):
        return {"item": item, "method": method, "stage": stage, "input_tokens": 10, "output_tokens": 2,
                "prefill_ms": prefill, "decode_ms": decode, "fusion_ms": fusion}

    rows = [row("receiver", "receiver", "a", 1, 10), row("receiver", "receiver", "b", 3, 30),
            row("receiver", "receiver", "c", 2, 20),
            row("c2c", "sharer", "a", 1, 0, 5), row("c2c", "receiver", "a", 1, 10),
            row("c2c", "sharer", "b", 2, 0, 5), row("c2c", "receiver", "b", 1, 30)]
    table = {(t["method"], t["stage"]): t for t in phase_table(rows)}
    assert table[("receiver", "receiver")]["prefill_ms"] == 2 and table[("receiver", "receiver")]["decode_ms"] == 20
    assert table[("receiver", "receiver")]["method_total_ms"] == 22
    assert table[("c2c", "sharer")]["method_total_ms"] == (17 + 38) / 2  # per-item totals 17 and 38
    per_query = {t["method"]: t for t in time_per_query(rows)}
    assert per_query["receiver"]["mean_ms"] == 22 and per_query["c2c"]["median_ms"] == 27.5
