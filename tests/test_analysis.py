"""Cache transformation oracle (paired keys, MLP, nearest-neighbour ratio, t-SNE) and gate analysis on the tiny pair."""

import json

import pytest
import torch
from threadpoolctl import threadpool_limits

from c2c.align import TokenAligner
from c2c.analysis import (
    cache_transformation,
    collect_keys,
    fit_key_mlp,
    fuser_projection,
    gate_history,
    gate_table,
    nn_ratio,
    transformation_rows,
    tsne_points,
)
from c2c.benchmarks import load_benchmark, write_tiny_fixtures
from c2c.methods import chat_messages
from conftest import make_fuser

LAYERS = [1, 3]



@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    folder = write_tiny_fixtures(tmp_path_factory.mktemp("bench"))["arc-challenge"]
    return [chat_messages(i) for i in load_benchmark("arc-challenge", folder)][:4]


@pytest.fixture(scope="module")
def pairs(tiny_receiver, tiny_sharer, chats):
    with threadpool_limits(1):
        return collect_keys(*tiny_receiver, *tiny_sharer, chats, LAYERS, batch_size=3)


def test_collect_keys_pairs_aligned_message_tokens(tiny_receiver, tiny_sharer, chats, pairs):
    receiver, receiver_tokenizer = tiny_receiver
    sharer, sharer_tokenizer = tiny_sharer
    aligner = TokenAligner(receiver_tokenizer, sharer_tokenizer)
    fused = sum(sum(aligner.align_chat(c).fuse_mask) for c in chats)  # message tokens of all prompts
    assert set(pairs) == set(LAYERS)
    for x, y in pairs.values():
        assert x.shape == (fused, 3 * 8) and y.shape == (fused, 2 * 16)  # sharer 3 x 8, receiver 2 x 16
        assert x.dtype == y.dtype == torch.float32 and torch.isfinite(x).all() and torch.isfinite(y).all()
    # the first prompt, alone and unpadded: its first message token's receiver key at layer 3
    ids = torch.tensor([aligner.align_chat(chats[0]).receiver_ids])
    first = aligner.align_chat(chats[0]).fuse_mask.index(True)
    cache = receiver(input_ids=ids, use_cache=True).cache
    expected = cache.layers[3].keys[0, :, first].flatten()  # (Hr*Dr,)
    torch.testing.assert_close(pairs[3][1][0], expected, rtol=0, atol=1e-5)
    # ... and the sharer's key of the same token: terminal layer map 3 <- 2, aligned position
    aligned = aligner.align_chat(chats[0])
    sharer_cache = sharer(input_ids=torch.tensor([aligned.sharer_ids]), use_cache=True).cache
    expected = sharer_cache.layers[2].keys[0, :, aligned.sharer_index[first]].flatten()  # (Hs*Ds,)
    torch.testing.assert_close(pairs[3][0][0], expected, rtol=0, atol=1e-5)
    values = collect_keys(*tiny_receiver, *tiny_sharer, chats[:1], [3], kind="values")
    torch.testing.assert_close(values[3][1][0], cache.layers[3].values[0, :, first].flatten(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        collect_keys(*tiny_receiver, *tiny_sharer, chats, [4])


def test_mlp_fit_reduces_loss_and_lands_inside_the_receiver_cloud(pairs):
    x, y = pairs[3]
    train, test = slice(0, 450), slice(450, None)
    mlp, losses = fit_key_mlp(x[train], y[train], hidden=64, steps=150, batch_size=256)
    assert len(losses) == 150
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10
    with torch.no_grad():
        projected = mlp(x[test])
    assert projected.shape == y[test].shape
    raw, mapped = nn_ratio(x[test], y[test]), nn_ratio(projected, y[test])
    assert mapped < raw
    assert nn_ratio(y[test][::2], y[test][1::2]) == pytest.approx(1, abs=0.5)  # receiver vs receiver: ~1


def test_nn_ratio_on_known_points():
    grid = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # own NN distance 1
    assert nn_ratio(grid + 0.25, grid) == pytest.approx((0.25**2 * 2) ** 0.5)
    assert nn_ratio(grid + 10, grid) > 10
    assert nn_ratio(torch.tensor([[3.0]]), grid) == pytest.approx(2.0)  # zero-padded to (3, 0)


def test_tsne_points_shape_and_labels():
    torch.manual_seed(0)
    groups = {"receiver": torch.randn(40, 6), "sharer": torch.randn(40, 4) + 5, "projected": torch.randn(40, 6)}
    coords, labels = tsne_points(groups, perplexity=30, max_points=30)
    assert coords.shape == (90, 2) and labels == ["receiver"] * 30 + ["sharer"] * 30 + ["projected"] * 30
    assert abs(coords).max() > 0


def test_cache_transformation_end_to_end(tiny_receiver, tiny_sharer, chats):
    results = cache_transformation(*tiny_receiver, *tiny_sharer, chats[:3], [3], hidden=32, steps=60,
                                   fit_batch_size=128, perplexity=10, max_points=60)
    (r,) = results
    assert r["layer"] == 3 and r["sharer_layer"] == 2 and r["sharer_padded"]  # terminal map: 3 <- 2
    assert r["n_train"] + r["n_test"] > 100 and len(r["losses"]) == 60
    assert r["coords"].shape == (180, 2) and r["labels"].count("projected") == 60
    assert r["nn_ratio_projected"] > 0 and r["nn_ratio_sharer"] > 0
    (row,) = transformation_rows(results)
    assert row["final_loss"] == r["losses"][-1] and "coords" not in row


def test_fuser_projection_is_the_fusers_p(tiny_receiver, tiny_sharer, pairs):
    """For the projection-only variant, delta = P - X_r: fuser_projection must return that P."""
    receiver, sharer = tiny_receiver[0], tiny_sharer[0]
    fuser = make_fuser(receiver, sharer, seed=1, variant="projection")
    x, y = pairs[3][0][:20], pairs[3][1][:20]  # (M, 24), (M, 32)
    G, L = 2 * receiver.config.num_hidden_layers, receiver.config.num_hidden_layers
    sharer_kv = x.view(1, 20, 3, 8).transpose(1, 2).unsqueeze(0).expand(G, 1, 3, 20, 8)  # every group the same
    receiver_kv = y.view(1, 20, 2, 16).transpose(1, 2).unsqueeze(0).expand(G, 1, 2, 20, 16)
    with torch.no_grad():
        p = fuser.delta(sharer_kv, receiver_kv) + receiver_kv  # (G, 1, Hr, M, Dr)
    for t in (0, L - 1):
        for kind, g in (("keys", 2 * t), ("values", 2 * t + 1)):
            expected = p[g, 0].transpose(0, 1).reshape(20, 32)
            torch.testing.assert_close(fuser_projection(fuser, t, x, y, kind), expected, rtol=1e-5, atol=1e-5)
    full = make_fuser(receiver, sharer, seed=1)
    assert fuser_projection(full, 3, x, y).shape == (20, 32)

def test_cache_transformation_with_a_fusers_projection(tiny_receiver, tiny_sharer, chats):
    full = make_fuser(tiny_receiver[0], tiny_sharer[0], seed=1)  # the full variant reads sharer and receiver
    (r,) = cache_transformation(*tiny_receiver, *tiny_sharer, chats[:2], [3], fuser=full, tsne=False)
    assert r["n_train"] == 0 and r["losses"] == [] and "coords" not in r
    assert r["nn_ratio_projected"] > 0


def test_gate_table_reads_the_fuser(tiny_receiver, tiny_sharer):
    fuser = make_fuser(tiny_receiver[0], tiny_sharer[0])
    logits = torch.tensor([0.5, -1.0, -0.2, 2.0, 0.0, 0.1, -3.0, -0.1])  # (2L,) K, V of layers 0..3
    with torch.no_grad():
        fuser.gate_logit.copy_(logits)
    rows = gate_table(fuser)
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    assert [r["key_logit"] for r in rows] == pytest.approx([0.5, -0.2, 0.0, -3.0])
    assert [r["value_logit"] for r in rows] == pytest.approx([-1.0, 2.0, 0.1, -0.1])
    assert [(r["key_open"], r["value_open"]) for r in rows] == [(True, False), (False, True), (False, True),
                                                                 (False, False)]
    with pytest.raises(ValueError):
        gate_table(make_fuser(tiny_receiver[0], tiny_sharer[0], variant="fusion"))


def test_gate_history_from_records_and_a_run_folder(tmp_path):
    records = [{"step": 0, "eval_loss": 2.0, "gate_logits": [[0.0, 0.0], [0.0, 0.0]]},
               {"step": 100, "eval_loss": 1.5},  # a record without gates
               {"step": 150, "train_loss": 1.2, "gate_logits": []},  # a variant without gates
               {"step": 200, "train_loss": 1.0, "gate_logits": [[0.3, -0.2], [-0.5, 0.9]]}]
    rows = gate_history(records)
    assert [(r["step"], r["layer"], r["key_logit"], r["value_logit"], r["key_open"], r["value_open"])
            for r in rows] == [(0, 0, 0.0, 0.0, False, False), (0, 1, 0.0, 0.0, False, False),
                               (200, 0, 0.3, -0.2, True, False), (200, 1, -0.5, 0.9, False, True)]
    # c2c.train's run folder holds them as log.jsonl
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert gate_history(tmp_path / "log.jsonl") == rows
    assert gate_history(tmp_path) == rows
    with pytest.raises(ValueError, match="no gate logits"):
        gate_history([{"step": 1, "train_loss": 0.5}])
    with pytest.raises(ValueError, match="no 'step'"):
        gate_history([{"gate_logits": [[0.1, 0.2]]}])
