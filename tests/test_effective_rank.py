"""Effective rank: the formula against float64 references, and the caches it reads against per-prompt runs."""

import math

import numpy as np
import pytest
import torch

from c2c.effective_rank import cache_effective_ranks, effective_rank, erank_by_layer, erank_table
from c2c.fused import C2CModel
from conftest import make_fuser

PROMPTS = [
    [{"role": "user", "content": "Which gas do plants take in to make sugar? A. oxygen B. carbon dioxide"}],
    [{"role": "user", "content": "Hi there, what is two plus two?"}],
]


def numpy_erank(matrix: np.ndarray) -> float:
    s = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_effective_rank_of_known_matrices():
    assert effective_rank(torch.eye(7)) == pytest.approx(7.0, abs=1e-12)
    assert effective_rank(3.0 * torch.eye(5)[:, :3]) == pytest.approx(3.0, abs=1e-12)  # scale-free, min(M, N)
    rank_one = torch.outer(torch.arange(1.0, 6.0), torch.tensor([2.0, -1.0, 0.5]))
    assert effective_rank(rank_one) == pytest.approx(1.0, abs=1e-9)
    p = np.array([2 / 3, 1 / 3])  # singular values 2 and 1
    assert effective_rank(torch.diag(torch.tensor([2.0, 1.0]))) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    generator = torch.Generator().manual_seed(0)
    for shape in [(40, 16), (16, 40), (64, 64)]:
        matrix = torch.randn(shape, generator=generator) * torch.linspace(0.1, 3.0, shape[1])
        value = effective_rank(matrix)
        assert value == pytest.approx(numpy_erank(matrix.numpy()), rel=1e-9)
        assert 1.0 <= value <= min(shape)
    with pytest.raises(ValueError, match="undefined"):
        effective_rank(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="2-D"):
        effective_rank(torch.ones(2, 3, 4))


@pytest.mark.parametrize("gate_logit", [-1.0, 1.0])
def test_cache_ranks_read_each_prompts_fused_positions(tiny_receiver, tiny_sharer, gate_logit):
    """Batched and padded, each row equals the erank of that prompt's caches computed alone; closed gates:
    the fused cache is the receiver's."""
    (receiver, receiver_tokenizer), (sharer, sharer_tokenizer) = tiny_receiver, tiny_sharer
    fuser = make_fuser(receiver, sharer, seed=1, gate_logit=gate_logit)
    model = C2CModel(receiver, receiver_tokenizer, [sharer], [sharer_tokenizer], [fuser])
    inputs = model.prepare(PROMPTS)
    assert (inputs.attention_mask == 0).any()  # really padded
    rows = cache_effective_ranks(model, inputs)
    L = receiver.config.num_hidden_layers
    assert len(rows) == len(PROMPTS) * 2 * L * 3
    table = {(r["prompt"], r["layer"], r["kind"], r["cache"]): r for r in rows}
    for b, prompt in enumerate(PROMPTS):
        aligned = model.aligners[0].align_chat(prompt)
        n = len(aligned.receiver_ids) - 1
        keep = torch.tensor(aligned.fuse_mask[:n])
        with torch.no_grad():
            r_cache = receiver(input_ids=torch.tensor([aligned.receiver_ids[:n]]), use_cache=True).cache
            s_cache = sharer(input_ids=torch.tensor([aligned.sharer_ids]), use_cache=True).cache
        with torch.no_grad():
            f_cache = model.prefill(model.prepare([prompt]))
        index = aligned.sharer_index[:n]
        for t in range(L):
            for kind, attr in (("key", "keys"), ("value", "values")):
                sharer_side = getattr(s_cache.layers[fuser.config.layer_map[t]], attr)[0][:, index]  # (Hs, n, Ds)
                expected = {"receiver": getattr(r_cache.layers[t], attr)[0], "sharer": sharer_side,
                            "fused": getattr(f_cache.layers[t], attr)[0]}
                for cache, x in expected.items():
                    x = x[:, keep]  # (H, tokens, D)
                    matrix = x.permute(1, 0, 2).reshape(x.shape[1], -1)
                    row = table[(b, t, kind, cache)]
                    assert row["tokens"] == int(keep.sum())
                    assert row["erank"] == pytest.approx(numpy_erank(matrix.numpy()), rel=1e-4), (b, t, kind, cache)
                if gate_logit < 0:
                    assert table[(b, t, kind, "fused")]["erank"] == table[(b, t, kind, "receiver")]["erank"]
    if gate_logit > 0:
        assert any(table[k]["erank"] != table[k[:3] + ("receiver",)]["erank"] for k in table if k[3] == "fused")


def test_layer_and_table_averages():
    rows = [{"prompt": p, "layer": t, "kind": kind, "cache": cache, "tokens": 5,
             "erank": 1.0 + p + 10 * t + (kind == "value") + {"sharer": 100, "receiver": 0, "fused": 0.5}[cache]}
            for p in (0, 1) for t in (0, 1, 2) for kind in ("key", "value") for cache in ("sharer", "receiver", "fused")]
    by_layer = erank_by_layer(rows)
    assert [(r["layer"], r["kind"]) for r in by_layer] == [(t, k) for t in (0, 1, 2) for k in ("key", "value")]
    first = by_layer[0]
    assert (first["receiver"], first["fused"], first["sharer"], first["prompts"]) == (1.5, 2.0, 101.5, 2)
    table = erank_table(by_layer)
    assert [r["cache"] for r in table] == ["K cache", "V cache"]
    assert table[0]["receiver"] == pytest.approx(11.5) and table[1]["receiver"] == pytest.approx(12.5)
    assert table[0]["fused_minus_receiver"] == pytest.approx(0.5) and table[0]["layers"] == 3
