"""Import of the published nics-efc/C2C_Fuser layout, checked against an independent float64 reference.

The test writes a checkpoint in the exact published layout (projector_{i}.pt / .json,
projector_config.json, config.json) from per-layer tensors, computes the fuser of every layer
with plain float64 tensor code written from the spec, and requires the imported stacked fuser
to give the same fused caches.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from c2c.checkpoint import import_published

SHAPES = dict(source_dim=2, target_dim=4, source_num_heads=3, target_num_heads=2, intermediate_dim=6,
              hidden_dim=8, num_layers=4)  # num_layers=4: two projection blocks


def block_tensors(prefix, hidden, intermediate, generator):
    return {f"{prefix}.norm.weight": 1 + 0.1 * torch.randn(hidden, generator=generator, dtype=torch.float64),
            f"{prefix}.w1.weight": torch.randn(intermediate, hidden, generator=generator, dtype=torch.float64) / 3,
            f"{prefix}.w2.weight": torch.randn(hidden, intermediate, generator=generator, dtype=torch.float64) / 3}


def published_projector(seed, gate_key, gate_value):
    """One projector's state dict with the published key names and nn.Linear (out, in) layouts."""
    g = torch.Generator().manual_seed(seed)
    s = SHAPES
    d_in = s["source_dim"] * s["source_num_heads"] + s["target_dim"] * s["target_num_heads"]
    d_out, h, i = s["target_dim"] * s["target_num_heads"], s["hidden_dim"], s["intermediate_dim"]
    state = {}
    for p, gate in (("key", gate_key), ("value", gate_value)):
        rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64) / 3
        state.update({f"{p}_in.weight": rand(h, d_in), f"{p}_in.bias": rand(h)})
        state.update(block_tensors(f"{p}_mlp1.blocks.0", h, i, g))
        for b in range(s["num_layers"] - 2):
            state.update(block_tensors(f"{p}_proj_mlp2.blocks.{b}", h, i, g))
        state.update({f"{p}_proj_out.weight": rand(d_out, h), f"{p}_proj_out.bias": rand(d_out)})
        state.update(block_tensors(f"{p}_scalar_mlp2.blocks.0", h, h, g))
        state.update({f"{p}_scalar_head.weight": rand(s["target_num_heads"], h),
                      f"{p}_scalar_head.bias": rand(s["target_num_heads"])})
        state[f"{p}_gate_logit"] = torch.tensor(gate, dtype=torch.float64)
    state["gate_temperature"] = torch.tensor(0.37)
    return state


def reference_block(x, state, prefix):
    """x + W2 GELU(W1 RMSNorm(x)), RMSNorm eps 1e-6, in float64."""
    normed = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * state[f"{prefix}.norm.weight"]
    return x + F.gelu(normed @ state[f"{prefix}.w1.weight"].T) @ state[f"{prefix}.w2.weight"].T


def reference_fuse(state, p, sharer, receiver):
    """One receiver layer, one of K/V: sharer (B, Hs, N, Ds), receiver (B, Hr, N, Dr) -> fused receiver."""
    B, Hr, N, Dr = receiver.shape
    xs = sharer.permute(0, 2, 1, 3).reshape(B, N, -1)
    xr = receiver.permute(0, 2, 1, 3).reshape(B, N, -1)
    h = torch.cat([xs, xr], -1) @ state[f"{p}_in.weight"].T + state[f"{p}_in.bias"]
    h = reference_block(h, state, f"{p}_mlp1.blocks.0")
    projected = h
    for b in range(SHAPES["num_layers"] - 2):
        projected = reference_block(projected, state, f"{p}_proj_mlp2.blocks.{b}")
    projected = projected @ state[f"{p}_proj_out.weight"].T + state[f"{p}_proj_out.bias"]
    projected = projected.view(B, N, Hr, Dr).permute(0, 2, 1, 3)
    weight = reference_block(h, state, f"{p}_scalar_mlp2.blocks.0")
    alpha = torch.sigmoid(weight @ state[f"{p}_scalar_head.weight"].T + state[f"{p}_scalar_head.bias"])
    alpha = alpha.permute(0, 2, 1).unsqueeze(-1)  # (B, Hr, N, 1)
    gate = float(state[f"{p}_gate_logit"] > 0)  # inference: hard gate
    return receiver + gate * alpha * projected


def write_published(folder, layer_map, gates):
    """The published folder layout: one projector per receiver layer."""
    folder.mkdir(parents=True, exist_ok=True)
    states = []
    for t, (gate_key, gate_value) in enumerate(gates):
        state = published_projector(seed=t, gate_key=gate_key, gate_value=gate_value)
        states.append(state)
        torch.save(state, folder / f"projector_{t}.pt")
        init_args = {**SHAPES, "dropout": 0.1, "initial_temperature": 1.0, "final_temperature": 0.001,
                     "anneal_steps": 1929, "dtype": {"__type__": "torch.dtype", "value": "bfloat16"},
                     "zero_init": False}
        (folder / f"projector_{t}.json").write_text(json.dumps({"class": "C2CProjector", "init_args": init_args}))
    layout = {"0": {"1": {str(t): [[s, t]] for t, s in enumerate(layer_map)}}}
    (folder / "projector_config.json").write_text(json.dumps(layout))
    (folder / "config.json").write_text(json.dumps({"model_names": ["receiver", "sharer"]}))
    return states


def test_import_matches_float64_reference(tmp_path):
    layer_map = [0, 0, 1]
    gates = [(1.0, -1.0), (-0.5, 2.0), (3.0, 0.7)]
    states = write_published(tmp_path / "ckpt", layer_map, gates)
    fuser = import_published(tmp_path / "ckpt", dtype=torch.float64)
    assert fuser.config.layer_map == layer_map
    assert fuser.config.num_layers == 4 and fuser.config.hidden_dim == 8
    assert fuser.gate_temperature.item() == pytest.approx(0.37)
    assert fuser.sharer_groups.tolist() == [0, 1, 0, 1, 2, 3]

    g = torch.Generator().manual_seed(42)
    B, N = 2, 5
    sharer_layers = [torch.randn(2, B, 3, N, 2, generator=g, dtype=torch.float64) for _ in range(2)]  # (K/V, ...)
    receiver_layers = [torch.randn(2, B, 2, N, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    sharer_kv = torch.cat([sharer_layers[s] for s in layer_map])  # (2L, B, Hs, N, Ds), K then V per layer
    receiver_kv = torch.cat(receiver_layers)
    fused = fuser(sharer_kv, receiver_kv)
    for t, s in enumerate(layer_map):
        for path_index, p in enumerate(("key", "value")):
            expected = reference_fuse(states[t], p, sharer_layers[s][path_index], receiver_layers[t][path_index])
            torch.testing.assert_close(fused[2 * t + path_index], expected, rtol=1e-12, atol=1e-12)
    assert not torch.equal(fused, receiver_kv)  # some gates are open: the check is not vacuous
    assert torch.equal(fused[1], receiver_kv[1])  # layer 0 V gate is closed


def test_import_checks_the_model_pair(tmp_path, tiny_receiver, tiny_sharer):
    write_published(tmp_path / "ckpt", [0, 0, 1], [(1.0, 1.0)] * 3)
    with pytest.raises(ValueError, match="receiver num_hidden_layers: fuser expects 3, model has 4"):
        import_published(tmp_path / "ckpt", tiny_receiver[0].config, tiny_sharer[0].config)


def test_import_rejects_wrong_keys_and_missing_files(tmp_path):
    folder = tmp_path / "ckpt"
    write_published(folder, [0, 1], [(1.0, 1.0)] * 2)
    state = torch.load(folder / "projector_1.pt")
    state["key_in.weight"] = state["key_in.weight"][:, :3]
    torch.save(state, folder / "projector_1.pt")
    with pytest.raises(ValueError, match="key_in.weight"):
        import_published(folder)
    del state["key_in.weight"]
    torch.save(state, folder / "projector_1.pt")
    with pytest.raises(ValueError, match="missing.*key_in.weight"):
        import_published(folder)
    (folder / "projector_0.json").unlink()
    with pytest.raises(FileNotFoundError, match="projector_0.json"):
        import_published(folder)
    with pytest.raises(ValueError, match="no entry for receiver 0 <- sharer 2"):
        import_published(folder, sharer_index=2)
