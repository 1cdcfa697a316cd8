"""Section-3 oracles on the tiny receiver: cache enrichment (positions, slicing, batching) and layer-wise enrichment."""

import csv

import pytest
import torch

from c2c.benchmarks import load_benchmark, write_tiny_fixtures
from c2c.fused import position_ids, prefix_cache
from c2c.methods import chat_messages, letter_scoring, render_ids
from c2c.oracle import (
    best_layers,
    cache_enrichment,
    enrich_batch,
    fewshot_messages,
    last_token_logits,
    layer_mixed_logits,
    layerwise_enrichment,
    load_exemplars,
    pick_exemplars,
    question_span,
    rerotate_keys,
    worst_layers,
    write_table,
)

SHOTS = 1



@pytest.fixture(scope="module")
def arc(tmp_path_factory):
    """(test items, validation exemplars) of the tiny ARC fixture."""
    folder = write_tiny_fixtures(tmp_path_factory.mktemp("bench"))["arc-challenge"]
    items = load_benchmark("arc-challenge", folder)
    exemplars = load_benchmark("arc-challenge", folder, split="validation")
    assert len(items) >= 6 and len(exemplars) >= 1
    return list(items), list(exemplars)


@pytest.fixture(scope="module")
def model(tiny_receiver):
    return tiny_receiver


@pytest.fixture(scope="module", params=["tiny-receiver", "tiny-sharer"])
def any_model(request, tiny_receiver, tiny_sharer):
    """Qwen3 + ChatML (the direct prompt is all suffix, k = 0); Llama + Llama-3 template (BOS kept, k = 1)."""
    return tiny_receiver if request.param == "tiny-receiver" else tiny_sharer


@pytest.fixture(scope="module")
def batch(any_model, arc):
    """Direct / few-shot / oracle of 3 items of different lengths (padded batch), both position modes."""
    (receiver, tokenizer), (items, exemplars) = any_model, arc
    items = sorted(items, key=lambda i: len(i.question))[::3][:3]
    out = {mode: enrich_batch(receiver, tokenizer, items, exemplars, shots=SHOTS, positions=mode)
           for mode in ("shift", "keep")}
    assert len(set(out["shift"].direct_lengths)) > 1  # really padded
    return out


def _fewshot_rows(tokenizer, items, exemplars):
    """Few-shot prompt ids and the start k of the kept suffix, per item."""
    scoring = letter_scoring(tokenizer)
    rows = [render_ids(tokenizer, fewshot_messages(i, pick_exemplars(i, exemplars, SHOTS), scoring.prefix),
                       scoring.prefix) for i in items]
    direct = [render_ids(tokenizer, chat_messages(i), scoring.prefix) for i in items]
    return rows, [question_span(d, f) for d, f in zip(direct, rows)]


def test_question_span():
    assert question_span([1, 2, 3, 4], [1, 9, 9, 2, 3, 4]) == 1  # header token kept from the start
    assert question_span([5, 2, 3], [7, 8, 5, 2, 3]) == 0  # the whole direct prompt is the suffix
    assert question_span([1, 2, 3], [1, 2, 3]) == 0  # nothing inserted
    with pytest.raises(ValueError):
        question_span([1, 2, 3, 4], [1, 2, 3, 5])  # last token differs
    with pytest.raises(ValueError):
        question_span([1, 2, 3, 4], [7, 9, 2, 3, 4])  # not one inserted span
    with pytest.raises(ValueError):
        question_span([1, 2, 3, 4], [3, 4])  # shorter


def test_fewshot_prompt_is_direct_with_exemplars_inserted(model, tiny_sharer, arc):
    items, exemplars = arc
    item = items[0]
    messages = fewshot_messages(item, exemplars[:1])
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == f"The correct answer is {exemplars[0].answer}"
    assert messages[2:] == chat_messages(item)
    # ChatML: the whole direct prompt is the suffix; Llama-3 template: the BOS is kept from the start
    for (_, tokenizer), start in ((model, 0), (tiny_sharer, 1)):
        direct, fewshot = render_ids(tokenizer, chat_messages(item)), render_ids(tokenizer, messages)
        assert question_span(direct, fewshot) == start
        assert len(fewshot) > len(direct)


def test_exemplar_selection(tmp_path, arc):
    items, exemplars = arc
    assert pick_exemplars(items[0], exemplars, 5) == exemplars[:5]
    assert pick_exemplars(exemplars[0], exemplars, 5) == exemplars[1:6]  # never the item itself
    by_subject = {items[0].subject: exemplars}
    assert pick_exemplars(items[0], by_subject, 1) == exemplars[:1]
    assert pick_exemplars(items[0], {"other": exemplars}, 1) == []
    folder = write_tiny_fixtures(tmp_path)["ceval"]
    dev = load_exemplars("ceval", folder, split="dev", shots=5)
    assert list(dev) == ["computer_network"] and len(dev["computer_network"]) == 1


def test_oracle_cache_is_as_long_as_direct(batch):
    for out in batch.values():
        d_width = out.direct_ids.shape[1]
        for (k_d, v_d), (k_o, v_o) in zip(out.direct_kv, out.oracle_kv):
            assert k_o.shape == k_d.shape == v_o.shape == (3, k_d.shape[1], d_width - 1, k_d.shape[3])
        assert all(f > d for f, d in zip(out.fewshot_lengths, out.direct_lengths))
        assert set(out.logits) == {"direct", "few-shot", "oracle"}
        assert all(v.shape == (3, out.logits["direct"].shape[1]) for v in out.logits.values())


def test_keep_mode_is_fewshot_with_the_exemplars_masked(any_model, batch, arc):
    """positions="keep": exactly the few-shot forward whose scored token cannot see the exemplar columns."""
    (receiver, tokenizer), out = any_model, batch["keep"]
    rows, starts = _fewshot_rows(tokenizer, out.items, arc[1])
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    cache = prefix_cache(receiver, ids, mask)
    hidden = mask.clone()
    for b, (r, d, k) in enumerate(zip(rows, out.direct_lengths, starts)):
        start = width - len(r) + k
        hidden[b, start: start + len(r) - d] = 0  # the exemplar span
    masked = last_token_logits(receiver, cache, ids, hidden, position_ids(mask)[:, -1])
    torch.testing.assert_close(out.logits["oracle"], masked, rtol=0, atol=1e-5)
    assert not torch.allclose(out.logits["oracle"], out.logits["few-shot"], atol=1e-3)
    assert torch.equal(out.oracle_last_position, torch.tensor(out.fewshot_lengths) - 1)


def test_shift_mode_puts_the_slice_at_direct_positions(any_model, batch, arc):
    """Layer 0's entries depend only on the token and its position: re-rotated, they are Direct's."""
    out = batch["shift"]
    real = out.direct_mask[:, :-1].bool()  # (B, Wd-1) non-padding cache columns
    (k_d, v_d), (k_o, v_o) = out.direct_kv[0], out.oracle_kv[0]
    torch.testing.assert_close(k_o.transpose(1, 2)[real], k_d.transpose(1, 2)[real], rtol=1e-4, atol=5e-5)
    torch.testing.assert_close(v_o.transpose(1, 2)[real], v_d.transpose(1, 2)[real], rtol=0, atol=1e-6)
    # deeper layers were computed while attending to the exemplars: enriched, not equal
    k1_d, k1_o = out.direct_kv[1][0].transpose(1, 2)[real], out.oracle_kv[1][0].transpose(1, 2)[real]
    assert (k1_d - k1_o).abs().max() > 1e-3
    assert torch.equal(out.oracle_last_position, torch.tensor(out.direct_lengths) - 1)
    torch.testing.assert_close(out.logits["direct"], batch["keep"].logits["direct"], rtol=0, atol=0)
    _, starts = _fewshot_rows(any_model[1], out.items, arc[1])
    if set(starts) == {0}:  # nothing kept before the exemplars: both modes see the same relative positions
        torch.testing.assert_close(out.logits["oracle"], batch["keep"].logits["oracle"], rtol=0, atol=1e-4)
    else:  # the kept header moved relative to the question: the modes differ
        assert set(starts) == {1}
        assert not torch.allclose(out.logits["oracle"], batch["keep"].logits["oracle"], atol=1e-4)


def test_rerotate_keys_matches_the_models_rope(model):
    receiver = model[0]
    rotary = receiver.model.rotary_emb
    torch.manual_seed(0)
    raw = torch.randn(2, 2, 5, 16)  # (B, H, N, D) pre-RoPE keys
    start, delta = torch.tensor([[7, 8, 9, 10, 11], [3, 4, 5, 6, 7]]), torch.tensor([[-5] * 5, [2] * 5])

    def rope(x, pos):
        cos, sin = rotary(x, pos)
        cos, sin = cos[:, None], sin[:, None]
        return x * cos + torch.cat([-x[..., 8:], x[..., :8]], -1) * sin

    moved = rerotate_keys(receiver, rope(raw, start), delta)
    torch.testing.assert_close(moved, rope(raw, start + delta), rtol=0, atol=1e-5)
    torch.testing.assert_close(rerotate_keys(receiver, moved, -delta), rope(raw, start), rtol=0, atol=1e-5)


def test_batching_does_not_change_the_scores(any_model, batch, arc):
    (receiver, tokenizer), out = any_model, batch["shift"]
    for b, item in enumerate(out.items):
        alone = enrich_batch(receiver, tokenizer, [item], arc[1], shots=SHOTS, positions="shift")
        for method in ("direct", "few-shot", "oracle"):
            torch.testing.assert_close(alone.logits[method][0], out.logits[method][b], rtol=0, atol=1e-4)


def test_no_exemplars_oracle_equals_direct_exactly(model, arc):
    (receiver, tokenizer), (items, _) = model, arc
    for mode in ("shift", "keep"):
        out = enrich_batch(receiver, tokenizer, items[:2], [], shots=SHOTS, positions=mode)
        assert out.fewshot_lengths == out.direct_lengths
        assert torch.equal(out.logits["oracle"], out.logits["direct"])
        assert torch.equal(out.logits["few-shot"], out.logits["direct"])


def test_enrichment_table(model, arc, tmp_path):
    (receiver, tokenizer), (items, exemplars) = model, arc
    rows = cache_enrichment(receiver, tokenizer, items, exemplars, shots=SHOTS, batch_size=4)
    assert [r["method"] for r in rows] == ["direct", "few-shot", "oracle"]
    direct, fewshot, oracle = rows
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["n"] == len(items) and r["accuracy"] == r["correct"] / r["n"]
    assert oracle["cache_length"] == direct["cache_length"] < fewshot["cache_length"]
    csv_path, md_path = write_table(rows, tmp_path / "out" / "enrichment")
    with csv_path.open() as f:
        back = list(csv.DictReader(f))
    assert [r["method"] for r in back] == ["direct", "few-shot", "oracle"]
    assert float(back[2]["cache_length"]) == oracle["cache_length"]
    md = md_path.read_text().splitlines()
    assert md[0].startswith("| method | accuracy |") and len(md) == 5


def test_layerwise_rows_and_the_two_ends(model, arc):
    (receiver, tokenizer), (items, exemplars) = model, arc
    L = receiver.config.num_hidden_layers
    rows = layerwise_enrichment(receiver, tokenizer, items, exemplars, shots=SHOTS, batch_size=4,
                                layer_sets={"odd": [1, 3]}, best_k=(2,), worst_k=(1, 2))
    assert [r["set"] for r in rows] == (["none", "few-shot"] + [f"layer {t}" for t in range(L)]
                                        + ["all", "odd", "best-2", "worst-1", "worst-2"])
    assert [r["layer"] for r in rows if r["kind"] == "single"] == list(range(L))
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["n"] == len(items)
        assert r["delta"] == pytest.approx(r["accuracy"] - rows[0]["accuracy"])
    by_set = {r["set"]: r for r in rows}
    assert by_set["best-2"]["layers"] == ",".join(map(str, best_layers(rows, 2)))
    assert by_set["worst-1"]["layers"] == ",".join(map(str, worst_layers(rows, 1)))
    assert by_set["worst-2"]["layers"] == ",".join(map(str, worst_layers(rows, 2)))
    singles = {r["layer"]: r["accuracy"] for r in rows if r["kind"] == "single"}
    worst = int(by_set["worst-1"]["layers"])  # a worst-1 set is its single layer: the same accuracy
    assert singles[worst] == min(singles.values()) and by_set["worst-1"]["accuracy"] == singles[worst]
    table = {r["method"]: r["accuracy"] for r in cache_enrichment(receiver, tokenizer, items, exemplars, shots=SHOTS)}
    assert by_set["none"]["accuracy"] == table["direct"] and by_set["all"]["accuracy"] == table["oracle"]
    assert by_set["few-shot"]["accuracy"] == table["few-shot"]


def test_layer_mixing_ends_are_exact(any_model, batch):
    """No layer enriched == Direct and every layer == Oracle, bit for bit; layer 0 alone ~ Direct."""
    receiver, out = any_model[0], batch["shift"]
    L = receiver.config.num_hidden_layers
    assert torch.equal(layer_mixed_logits(receiver, out, []), out.logits["direct"])
    assert torch.equal(layer_mixed_logits(receiver, out, range(L)), out.logits["oracle"])
    torch.testing.assert_close(layer_mixed_logits(receiver, out, [0]), out.logits["direct"], rtol=0, atol=1e-4)
    assert not torch.allclose(layer_mixed_logits(receiver, out, [L - 1]), out.logits["direct"], atol=1e-3)


def test_best_layers_ranks_single_layer_rows():
    rows = [{"kind": "none", "layer": None, "accuracy": 0.5}] + [
        {"kind": "single", "layer": t, "accuracy": a} for t, a in enumerate([0.4, 0.7, 0.5, 0.7])]
    assert best_layers(rows, 1) == [1]
    assert best_layers(rows, 2) == [1, 3]
    assert best_layers(rows, 3) == [1, 2, 3]
    with pytest.raises(ValueError):
        best_layers(rows, 5)
    assert worst_layers(rows, 1) == [0]
    assert worst_layers(rows, 2) == [0, 2]
    assert worst_layers(rows, 3) == [0, 1, 2]  # ties (layers 1 and 3): the lower layer first
    with pytest.raises(ValueError):
        worst_layers(rows, 5)
