"""The C2C fuser: paper parameter count, gates, temperature schedule, masking, no host syncs."""

import math

import pytest
import torch

from c2c.align import layer_map
from c2c.fuser import C2CFuser, FuserConfig, gate_temperature
from c2c.models import paper_shape_model

PAPER = dict(receiver_layers=28, receiver_kv_heads=8, receiver_head_dim=128, sharer_kv_heads=2, sharer_head_dim=64,
             layer_map=[max(0, t - 4) for t in range(28)])


def small_config(**options):
    base = dict(receiver_layers=3, receiver_kv_heads=2, receiver_head_dim=4, sharer_kv_heads=3, sharer_head_dim=2,
                layer_map=[0, 0, 1], hidden_dim=8, intermediate_dim=6, dropout=0.0)
    return FuserConfig(**{**base, **options})


def random_kv(config, batch=2, length=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    groups = 2 * config.receiver_layers
    sharer = torch.randn(groups, batch, config.sharer_kv_heads, length, config.sharer_head_dim, generator=generator)
    receiver = torch.randn(groups, batch, config.receiver_kv_heads, length, config.receiver_head_dim, generator=generator)
    return sharer, receiver


def test_paper_parameter_count_is_exact():
    with torch.device("meta"):
        fuser = C2CFuser(FuserConfig(**PAPER))
    assert sum(p.numel() for p in fuser.parameters()) == 477_848_056
    per_layer_kv_path = 8_533_000
    assert 28 * (2 * per_layer_kv_path + 2) == 477_848_056


def test_paper_pair_configs_give_the_paper_count():
    """Qwen3-0.6B <- Qwen2.5-0.5B built from configs (no weights): model sizes and the fuser count."""
    receiver = paper_shape_model("qwen3-0.6b", device="meta")
    sharer = paper_shape_model("qwen2.5-0.5b", device="meta")
    assert receiver.num_parameters() == 596_049_920 and sharer.num_parameters() == 494_032_768
    config = FuserConfig.for_models(receiver.config, sharer.config, layer_map(28, 24))
    with torch.device("meta"):
        fuser = C2CFuser(config)
    assert sum(p.numel() for p in fuser.parameters()) == 477_848_056


def test_gate_temperature_schedule():
    assert gate_temperature(0, 1.0, 0.001, 1929) == 1.0
    assert math.isclose(gate_temperature(1929 // 2, 1.0, 0.001, 1929), 0.001 ** ((1929 // 2) / 1929))
    assert math.isclose(gate_temperature(1929, 1.0, 0.001, 1929), 0.001)
    assert math.isclose(gate_temperature(5000, 1.0, 0.001, 1929), 0.001)  # clamped after annealing
    fuser = C2CFuser(small_config(anneal_steps=10))
    fuser.set_step(5)
    assert math.isclose(fuser.gate_temperature.item(), 0.001 ** 0.5, rel_tol=1e-6)
    assert "gate_temperature" in fuser.state_dict()  # saved with checkpoints, so resume keeps it


def test_closed_gates_return_the_receiver_cache_exactly():
    config = small_config()
    fuser = C2CFuser(config).eval()
    with torch.no_grad():
        fuser.gate_logit.fill_(-0.5)
    sharer, receiver = random_kv(config)
    assert torch.equal(fuser(sharer, receiver), receiver)


def test_open_gates_change_only_unmasked_positions():
    config = small_config()
    fuser = C2CFuser(config).eval()
    with torch.no_grad():
        fuser.gate_logit.fill_(0.5)
    sharer, receiver = random_kv(config)
    mask = torch.tensor([[True, False, True, True, False], [False, False, True, False, True]])
    fused = fuser(sharer, receiver, mask)
    changed = (fused != receiver).any(dim=(0, 2, 4))  # (B, N)
    assert torch.equal(changed, mask)


def test_one_layer_gate_opens_only_that_layer():
    config = small_config()
    fuser = C2CFuser(config).eval()
    with torch.no_grad():
        fuser.gate_logit.fill_(-1.0)
        fuser.gate_logit[3] = 1.0  # layer 1, values
    sharer, receiver = random_kv(config)
    changed = (fuser(sharer, receiver) != receiver).flatten(1).any(1)
    assert changed.tolist() == [False, False, False, True, False, False]
    assert fuser.open_gates().tolist() == [[False, False], [False, True], [False, False]]


@pytest.mark.parametrize("noise, expected", [("gumbel", 1 - math.exp(-1)), ("logistic", 0.5)])
def test_training_gate_open_probability(noise, expected):
    """At logit 0, tau -> 0: Gumbel noise opens 1 - exp(-1) = 63% (the paper's mismatch); logistic 50%."""
    fuser = C2CFuser(small_config(gate_noise=noise)).train()
    fuser.gate_temperature.fill_(1e-3)
    torch.manual_seed(0)
    gates = fuser.gates((6, 50, 2, 100, 1))
    assert gates.dtype == torch.float32
    assert abs((gates > 0.5).float().mean().item() - expected) < 0.01


def test_training_mode_draws_noise_per_element_and_dropout():
    config = small_config(dropout=0.1)
    fuser = C2CFuser(config).train()
    sharer, receiver = random_kv(config)
    torch.manual_seed(1)
    first = fuser(sharer, receiver)
    torch.manual_seed(2)
    second = fuser(sharer, receiver)
    assert not torch.equal(first, second)
    fuser.eval()
    assert torch.equal(fuser(sharer, receiver), fuser(sharer, receiver))


def test_forward_makes_no_host_synchronisation(monkeypatch):
    config = small_config()
    fuser = C2CFuser(config)
    sharer, receiver = random_kv(config)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside the fuser forward")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for mode in (True, False):
        fuser.train(mode)
        fuser(sharer, receiver, torch.ones(2, 5, dtype=torch.bool))


def test_bf16_fuser_on_fp32_cache_keeps_cache_dtype():
    config = small_config()
    fuser = C2CFuser(config).to(torch.bfloat16).eval()
    sharer, receiver = random_kv(config)
    assert fuser(sharer, receiver).dtype == torch.float32


def test_weight_decay_exemption_is_readable():
    assert C2CFuser(small_config()).no_weight_decay_parameter_names() == set()
    exempt = C2CFuser(small_config(exempt_gates_from_weight_decay=True)).no_weight_decay_parameter_names()
    assert exempt == {"gate_logit"}


def test_ablation_variants():
    """projection: P replaces the receiver cache; fusion: X_r + alpha * P without gates; full: the paper's."""
    config = small_config(variant="projection")
    projection = C2CFuser(config).eval()
    assert not hasattr(projection, "gate_logit") and not hasattr(projection, "weight_head")
    sharer, receiver = random_kv(config)
    fused = projection(sharer, receiver)
    # receiver cache ignored: X_r + (P - X_r) is P to fp32 rounding (~1e-7 here), a receiver term would be O(1)
    torch.testing.assert_close(projection(sharer, torch.zeros_like(receiver)), fused, rtol=0, atol=1e-5)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    assert torch.equal(projection(sharer, receiver, mask), receiver)  # unmasked positions keep the receiver's
    fusion = C2CFuser(small_config(variant="fusion")).eval()
    assert not hasattr(fusion, "gate_logit") and fusion.open_gates().all()
    assert not torch.equal(fusion(sharer, receiver), receiver)  # no gate: always fused
    counts = {v: sum(p.numel() for p in C2CFuser(small_config(variant=v)).parameters())
              for v in ("projection", "fusion", "full")}
    assert counts["projection"] < counts["fusion"] == counts["full"] - 6


@pytest.mark.parametrize("bad, message", [
    (dict(num_layers=1), "num_layers"),
    (dict(gate_noise="uniform"), "gate_noise"),
    (dict(variant="gateless"), "variant"),
    (dict(sharer_mlp_layers=1), "sharer_mlp_layers"),
    (dict(layer_map=[0, 1]), "layer_map"),
])
def test_bad_config_is_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        small_config(**bad)


def test_complex_fuser_maps_the_sharer_to_receiver_width_first():
    """C2C-C (sharer_mlp_layers=3) equals the default fuser of a sharer already of the receiver's shape, fed
    the sharer K/V after a 3-layer MLP computed here group by group in float64."""
    config = small_config(sharer_mlp_layers=3, dropout=0.0)
    complex_fuser = C2CFuser(config).double().eval()
    with torch.no_grad():
        complex_fuser.gate_logit.fill_(0.5)
    sharer, receiver = (t.double() for t in random_kv(config))
    G, B, Hs, N, Ds = sharer.shape
    Hr, Dr = config.receiver_kv_heads, config.receiver_head_dim
    linears = complex_fuser.sharer_mlp.linears
    assert [tuple(layer.weight.shape[1:]) for layer in linears] == [(Hs * Ds, 8), (8, 8), (8, Hr * Dr)]
    mapped = torch.empty(G, B, Hr, N, Dr, dtype=torch.float64)
    for g in range(G):
        x = sharer[g].permute(0, 2, 1, 3).reshape(B * N, Hs * Ds)
        for i, layer in enumerate(linears):
            x = x if i == 0 else torch.nn.functional.gelu(x)
            x = x @ layer.weight[g] + layer.bias[g, 0]
        mapped[g] = x.view(B, N, Hr, Dr).transpose(1, 2)
    plain_config = small_config(dropout=0.0, sharer_kv_heads=Hr, sharer_head_dim=Dr)
    plain = C2CFuser(plain_config).double().eval()
    state = {k: v for k, v in complex_fuser.state_dict().items() if not k.startswith("sharer_mlp.")}
    plain.load_state_dict(state)
    expected = plain(mapped, receiver)
    assert torch.allclose(complex_fuser(sharer, receiver), expected, rtol=0, atol=1e-12)
    assert not torch.equal(expected, receiver)
    extra = sum(p.numel() for p in linears.parameters())
    assert extra == G * ((Hs * Ds + 1) * 8 + 9 * 8 + 9 * Hr * Dr)  # per group: 3 Linear layers with bias
    default_count = sum(p.numel() for p in C2CFuser(small_config()).parameters())
    input_change = 2 * config.receiver_layers * 8 * (Hr * Dr - Hs * Ds)
    assert sum(p.numel() for p in complex_fuser.parameters()) == default_count + extra + input_change
