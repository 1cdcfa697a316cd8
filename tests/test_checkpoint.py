"""Our fuser checkpoints (C2CFuser.save_pretrained / from_pretrained): safetensors + JSON config, exact round
trip, strict loading; load_fuser detects our format (the published one: tests/test_published.py, test_methods.py)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from c2c.checkpoint import load_fuser
from c2c.fuser import C2CFuser
from conftest import make_fuser


@pytest.mark.parametrize("sharer_mlp_layers", [0, 3], ids=["c2c", "c2c-c"])
def test_round_trip_is_exact(tmp_path, tiny_receiver, tiny_sharer, sharer_mlp_layers):
    receiver, sharer = tiny_receiver[0], tiny_sharer[0]
    fuser = make_fuser(receiver, sharer, seed=5, receiver="tiny-receiver", sharer="tiny-sharer", alignment="longest",
                       sharer_mlp_layers=sharer_mlp_layers)
    fuser.set_step(700)
    fuser.save_pretrained(tmp_path / "fuser")
    config = json.loads((tmp_path / "fuser" / "fuser_config.json").read_text())
    assert config["receiver"] == "tiny-receiver" and config["sharer"] == "tiny-sharer"
    assert config["layer_map"] == [0, 0, 1, 2] and config["alignment"] == "longest"
    assert config["receiver_signature"]["model_type"] == "qwen3" and config["sharer_mlp_layers"] == sharer_mlp_layers
    loaded = C2CFuser.from_pretrained(tmp_path / "fuser", receiver.config, sharer.config)
    assert not loaded.training
    for name, tensor in fuser.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert torch.equal(loaded.sharer_groups, torch.tensor([0, 1, 0, 1, 2, 3, 4, 5]))  # layer map [0, 0, 1, 2]
    sharer_kv, receiver_kv = torch.randn(8, 1, 3, 4, 8), torch.randn(8, 1, 2, 4, 16)
    with torch.no_grad():
        fuser.gate_logit.fill_(1.0), loaded.gate_logit.fill_(1.0)
    assert torch.equal(fuser.eval()(sharer_kv, receiver_kv), loaded(sharer_kv, receiver_kv))


def test_loading_for_the_wrong_pair_names_the_mismatch(tmp_path, tiny_receiver, tiny_sharer):
    receiver, sharer = tiny_receiver[0], tiny_sharer[0]
    make_fuser(receiver, sharer).save_pretrained(tmp_path / "fuser")
    with pytest.raises(ValueError, match="receiver model_type: fuser expects qwen3, model has llama"):
        load_fuser(tmp_path / "fuser", sharer.config, receiver.config)


def test_loading_rejects_shapes_that_differ_from_the_config(tmp_path, tiny_receiver, tiny_sharer):
    folder = tmp_path / "fuser"
    make_fuser(tiny_receiver[0], tiny_sharer[0]).save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    state["input.weight"] = state["input.weight"][:, :, :5].contiguous()
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"input.weight: expected shape \(8, 56, 32\), found \(8, 56, 5\)"):
        load_fuser(folder)
    del state["input.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match="missing input.weight"):
        load_fuser(folder)


def test_missing_files_are_named(tmp_path, tiny_receiver, tiny_sharer):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_fuser(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds neither fuser_config.json .* nor projector_config.json"):
        load_fuser(tmp_path)
    make_fuser(tiny_receiver[0], tiny_sharer[0]).save_pretrained(tmp_path / "fuser")
    (tmp_path / "fuser" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors in"):
        load_fuser(tmp_path / "fuser")


def test_load_fuser_detects_our_format_and_loads_it_as_from_pretrained(tmp_path, tiny_receiver, tiny_sharer):
    receiver, sharer = tiny_receiver[0], tiny_sharer[0]
    make_fuser(receiver, sharer, seed=3).save_pretrained(tmp_path / "fuser")
    direct = C2CFuser.from_pretrained(tmp_path / "fuser", dtype=torch.float64)
    detected = load_fuser(tmp_path / "fuser", receiver.config, sharer.config, dtype=torch.float64)
    assert type(detected) is C2CFuser and detected.config == direct.config and not detected.training
    assert all(torch.equal(t, detected.state_dict()[n]) and t.dtype == torch.float64
               for n, t in direct.state_dict().items() if t.is_floating_point())
    with pytest.raises(FileNotFoundError, match="no fuser_config.json in"):
        C2CFuser.from_pretrained(tmp_path)


def test_the_fuser_module_does_not_import_the_checkpoint_module():
    """c2c.checkpoint imports c2c.fuser (to build fusers); the other way round would be an import cycle."""
    code = "import sys, c2c.fuser; print('c2c.checkpoint' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"
