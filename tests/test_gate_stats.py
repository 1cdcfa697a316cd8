"""Gate statistics: open fractions, and the dynamic weights recorded during fusion against delta / projection."""

import pytest
import torch

from c2c.analysis import fuser_projection
from c2c.fused import C2CModel
from c2c.gate_stats import dynamic_weight_table, gate_summary, record_dynamic_weights
from conftest import make_fuser


def test_gate_summary_counts_open_gates(tiny_receiver, tiny_sharer):
    fuser = make_fuser(tiny_receiver[0], tiny_sharer[0], gate_logit=-1.0)
    L = fuser.config.receiver_layers
    with torch.no_grad():
        fuser.gate_logit.view(L, 2)[0, 0] = 2.0  # layer 0 K open
        fuser.gate_logit.view(L, 2)[1:, 1] = 0.5  # V open from layer 1 on
    row = gate_summary(fuser, "f")
    assert row["fuser"] == "f" and row["layers"] == L
    assert row["key_open"] == pytest.approx(1 / L) and row["value_open"] == pytest.approx((L - 1) / L)
    assert row["all_open"] == pytest.approx(L / (2 * L))


def test_recorded_weights_are_delta_over_projection(tiny_receiver, tiny_sharer):
    """With open gates the fused-in term is alpha * P per head: alpha = delta / P (P from analysis.fuser_projection)."""
    fuser = make_fuser(tiny_receiver[0], tiny_sharer[0], seed=2, gate_logit=3.0)
    c = fuser.config
    G, B, N = 2 * c.receiver_layers, 2, 5
    generator = torch.Generator().manual_seed(0)
    sharer_kv = torch.randn(G, B, c.sharer_kv_heads, N, c.sharer_head_dim, generator=generator)
    receiver_kv = torch.randn(G, B, c.receiver_kv_heads, N, c.receiver_head_dim, generator=generator)
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])
    with torch.no_grad(), record_dynamic_weights(fuser) as calls:
        delta = fuser.delta(sharer_kv, receiver_kv, mask)  # (G, B, Hr, N, Dr)
    assert "delta" not in vars(fuser)  # the wrapper is gone after the block
    (alpha, recorded_mask), = calls
    assert alpha.shape == (G, B, N, c.receiver_kv_heads) and torch.equal(recorded_mask, mask)
    for g in range(G):
        kind = "values" if g % 2 else "keys"
        flat = lambda x: x[g].permute(0, 2, 1, 3).reshape(B * N, -1)  # noqa: E731  (B*N, H*D), rows (b, n)
        projected = fuser_projection(fuser, g // 2, flat(sharer_kv), flat(receiver_kv), kind)
        projected = projected.view(B, N, c.receiver_kv_heads, c.receiver_head_dim)
        ratio = (delta[g].permute(0, 2, 1, 3) / projected).mean(-1)  # (B, N, Hr)
        torch.testing.assert_close(ratio[mask], alpha[g][mask], rtol=1e-4, atol=1e-5)
        assert torch.all(delta[g].permute(0, 2, 1, 3)[~mask] == 0)
    table = dynamic_weight_table(calls, fuser)
    assert len(table) == c.receiver_layers
    expected_key = alpha[0][mask].mean()  # layer 0, K: mean over fused positions and heads
    assert table[0]["key_weight"] == pytest.approx(float(expected_key), rel=1e-6)
    assert table[0]["value_weight"] == pytest.approx(float(alpha[1][mask].mean()), rel=1e-6)
    assert all(row["key_open"] and row["value_open"] for row in table)


def test_weights_are_recorded_inside_the_fused_prefill(tiny_receiver, tiny_sharer):
    (receiver, receiver_tokenizer), (sharer, sharer_tokenizer) = tiny_receiver, tiny_sharer
    fuser = make_fuser(receiver, sharer, gate_logit=1.0)
    model = C2CModel(receiver, receiver_tokenizer, [sharer], [sharer_tokenizer], [fuser])
    inputs = model.prepare([[{"role": "user", "content": "Name a planet."}], [{"role": "user", "content": "Hi"}]])
    with torch.no_grad(), record_dynamic_weights(fuser) as calls:
        model.prefill(inputs)
    (alpha, mask), = calls
    n = inputs.input_ids.shape[1] - 1
    assert torch.equal(mask, inputs.sharers[0].fuse_mask[:, :n] & inputs.attention_mask[:, :n].bool())
    table = dynamic_weight_table(calls, fuser)
    assert all(0 < row["key_weight"] < 1 and 0 < row["value_weight"] < 1 for row in table)
    with pytest.raises(ValueError, match="no fusion"):
        dynamic_weight_table([], fuser)
    with pytest.raises(ValueError, match="no dynamic weights"):
        with record_dynamic_weights(make_fuser(receiver, sharer, variant="projection")):
            pass
