"""Table 14's shared latent space: O(M + N) modules with a gate per pair, the export of a pair as an ordinary fuser
(exact), closed gates reproducing the receiver, joint training that resumes exactly, and the evaluation config."""

import json
import math

import pytest
import torch

import c2c.latent
from c2c.fused import C2CModel
from c2c.fuser import C2CFuser, model_signature
from c2c.latent import LatentSystem, export_pair, latent_eval_config, latent_rows, pair_slug, train_latent
from c2c.records import records_path
from c2c.train import optimizer_groups

OPTIONS = {"hidden_dim": 16, "intermediate_dim": 16, "num_layers": 3, "dropout": 0.0}


def system_for(receivers, sharers, gate_logit=None, seed=0):
    torch.manual_seed(seed)
    system = LatentSystem({name: model_signature(m.config) for name, (m, _) in receivers.items()},
                          {name: model_signature(m.config) for name, (m, _) in sharers.items()}, 8, OPTIONS)
    if gate_logit is not None:
        with torch.no_grad():
            for row in system.fusers:
                for fuser in row:
                    fuser.gate_logit.fill_(gate_logit)
    return system.eval()


@pytest.fixture
def models(tiny_receiver, tiny_sharer):
    return {"tiny-receiver": tiny_receiver, "tiny-sharer": tiny_sharer}


def test_m_plus_n_modules_and_a_gate_per_pair(models):
    system = system_for(models, models)  # 2 receivers x 2 sharers
    for row in system.fusers:
        first, second = row
        assert first.input is second.input and first.projection_out is second.projection_out
        assert first.gate_logit is not second.gate_logit
    assert system.pairs[0][1].projector is system.pairs[1][1].projector
    # M projectors + N fusers (each with its first pair's gates) + the other pairs' gates
    expected = (sum(p.numel() for p in system.projectors.parameters())
                + sum(sum(p.numel() for p in row[0].parameters()) + row[1].gate_logit.numel() for row in system.fusers))
    assert sum(p.numel() for p in system.parameters()) == expected


def random_kv(fuser_config, batch=2, length=5, seed=1):
    generator = torch.Generator().manual_seed(seed)
    groups = 2 * fuser_config.receiver_layers
    sharer = torch.randn(groups, batch, fuser_config.sharer_kv_heads, length, fuser_config.sharer_head_dim,
                         generator=generator)
    receiver = torch.randn(groups, batch, fuser_config.receiver_kv_heads, length, fuser_config.receiver_head_dim,
                           generator=generator)
    return sharer, receiver


def test_an_exported_pair_is_the_same_function(models, tmp_path):
    """The projector multiplied into the fuser's first layer: the exported C2CFuser's term equals the pair's."""
    system = system_for(models, models, gate_logit=1.0)
    for j in range(2):
        for i in range(2):
            pair = system.pairs[j][i]
            folder = export_pair(system, j, i, tmp_path / f"{j}{i}")
            exported = C2CFuser.from_pretrained(folder).eval()
            assert exported.config == pair.config and exported.config.sharer_signature == model_signature(
                list(models.values())[i][0].config)
            sharer_kv, receiver_kv = random_kv(pair.config)
            mask = torch.tensor([[True] * 5, [False, True, True, True, True]])
            expected = pair.delta(sharer_kv, receiver_kv, mask)
            assert expected.abs().max() > 1e-3  # open gates: a real term
            torch.testing.assert_close(exported.delta(sharer_kv, receiver_kv, mask), expected, rtol=1e-5, atol=1e-5)


def test_closed_gates_reproduce_the_receiver_alone(models):
    (receiver, receiver_tokenizer), (sharer, sharer_tokenizer) = models["tiny-receiver"], models["tiny-sharer"]
    system = system_for({"tiny-receiver": models["tiny-receiver"]}, models, gate_logit=-1.0)
    fused = C2CModel(receiver, receiver_tokenizer, [receiver, sharer], [receiver_tokenizer, sharer_tokenizer],
                     system.pairs[0], multi_sharer="parallel")
    prompts = [[{"role": "user", "content": "What is the colour of the sky?"}],
               [{"role": "user", "content": "Name a fruit."}]]
    inputs = fused.prepare(prompts)
    greedy = {"max_new_tokens": 6, "do_sample": False}
    alone = receiver.generate(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, **greedy)
    assert torch.equal(fused.generate(inputs, **greedy), alone)
    opened = system_for({"tiny-receiver": models["tiny-receiver"]}, models, gate_logit=1.0)
    fused_open = C2CModel(receiver, receiver_tokenizer, [receiver, sharer], [receiver_tokenizer, sharer_tokenizer],
                          opened.pairs[0], multi_sharer="parallel")
    assert not torch.equal(fused_open.prefill(inputs).layers[-1].keys, fused.prefill(inputs).layers[-1].keys)


def test_weight_decay_spares_every_pair_s_gate_logits_where_the_options_say(models):
    system = system_for(models, models)
    assert optimizer_groups(system, 0.01) == [{"params": list(system.parameters()), "weight_decay": 0.01}]
    system.spec["fuser_options"] = {**OPTIONS, "exempt_gates_from_weight_decay": True}
    decay, no_decay = optimizer_groups(system, 0.01)
    gates = [fuser.gate_logit for row in system.fusers for fuser in row]
    assert no_decay["weight_decay"] == 0.0 and [id(p) for p in no_decay["params"]] == [id(g) for g in gates]
    assert len(decay["params"]) + len(gates) == len(list(system.parameters()))  # each tied weight once


def test_save_and_load_keep_the_tied_weights(models, tmp_path):
    system = system_for(models, models, gate_logit=0.5)
    loaded = LatentSystem.from_pretrained(system.save_pretrained(tmp_path / "system")).eval()
    assert loaded.fusers[1][0].input is loaded.fusers[1][1].input
    for a, b in zip(system.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="holds no latent system"):
        LatentSystem.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="sharer_mlp_layers"):
        LatentSystem({"r": {}}, {"s": {}}, 8, {"sharer_mlp_layers": 3})


TRAIN = {"max_steps": 4, "checkpoint_every": 2, "max_examples": 64, "batch_size": 8, "learning_rate": 1e-2,
         "fuser": {**OPTIONS, "exempt_gates_from_weight_decay": True}}
PAIR = (["tiny-receiver", "tiny-sharer"], ["tiny-sharer", "tiny-receiver"])


def test_joint_training_exports_every_pair_and_resumes_exactly(tmp_path, monkeypatch):
    whole = train_latent("configs/train_tiny.yaml", *PAIR, 8, tmp_path / "whole", TRAIN, progress=False)
    log = [json.loads(line) for line in (whole / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4]
    assert all(set(entry["loss"]) == set(PAIR[0]) for entry in log)
    held_out = json.loads((whole / "held_out_loss.json").read_text())
    assert set(held_out) == {"start", "end"} and all(set(v) == set(PAIR[0]) for v in held_out.values())
    assert all(math.isfinite(loss) and loss > 0 for v in held_out.values() for loss in v.values())
    slugs = sorted(p.name for p in (whole / "pairs").iterdir())
    assert slugs == sorted(pair_slug(r, s) for r in PAIR[0] for s in PAIR[1])
    # a run that stops after its step-2 checkpoint, then resumes: the same weights as the run that did not stop
    real_save = c2c.latent._save_checkpoint

    def save_then_stop(*args):
        real_save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(c2c.latent, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_latent("configs/train_tiny.yaml", *PAIR, 8, tmp_path / "stopped", TRAIN, progress=False)
    monkeypatch.setattr(c2c.latent, "_save_checkpoint", real_save)
    with (tmp_path / "stopped" / "log.jsonl").open("a") as log:  # as if it had logged step 3 before it stopped
        log.write(json.dumps({"step": 3, "loss": {}, "lr": 0.0}) + "\n")
    resumed = train_latent("configs/train_tiny.yaml", *PAIR, 8, tmp_path / "stopped", TRAIN, progress=False)
    assert (resumed / "log.jsonl").read_text() == (whole / "log.jsonl").read_text()  # each step once, as if not stopped
    a = LatentSystem.from_pretrained(whole / "final").state_dict()
    b = LatentSystem.from_pretrained(resumed / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    at_step_2 = LatentSystem.from_pretrained(resumed / "checkpoint").state_dict()
    for name in ("projectors.0.linear.weight", "projectors.1.linear.weight", "fusers.0.1.gate_logit"):
        assert not torch.equal(at_step_2[name], a[name]), name  # the receivers' losses reach every module
    before = (whole / "log.jsonl").read_text()
    train_latent("configs/train_tiny.yaml", *PAIR, 8, tmp_path / "whole", TRAIN, progress=False)  # finished: reused
    assert (whole / "log.jsonl").read_text() == before
    with pytest.raises(ValueError, match="with other settings"):
        train_latent("configs/train_tiny.yaml", *PAIR, 16, tmp_path / "whole", TRAIN, progress=False)


def test_the_evaluation_config_of_a_receiver(tmp_path, models):
    system = system_for(models, models, gate_logit=1.0)
    for j, receiver in enumerate(PAIR[0]):
        for i, sharer in enumerate(["tiny-receiver", "tiny-sharer"]):
            export_pair(system, j, i, tmp_path / "pairs" / pair_slug(receiver, sharer))
    config = latent_eval_config("configs/eval_tiny.yaml", tmp_path, "tiny-sharer", ["tiny-receiver", "tiny-sharer"],
                                benchmark="arc-challenge", limit=3)
    assert config["receiver"] == "tiny-sharer" and config["benchmarks"][0]["limit"] == 3
    assert [m["key"] for m in config["methods"]] == ["receiver", "c2c_tiny-receiver", "c2c_tiny-sharer", "c2c_all"]
    both = config["methods"][-1]
    assert both["multi_sharer"] == "parallel" and [m["sharer"] for m in both["more_sharers"]] == ["tiny-sharer"]
    with pytest.raises(FileNotFoundError, match="train the latent system first"):
        latent_eval_config("configs/eval_tiny.yaml", tmp_path / "none", "tiny-sharer", ["tiny-receiver"],
                           benchmark="arc-challenge", limit=3)
    with pytest.raises(ValueError, match="is not in"):
        latent_eval_config("configs/eval_tiny.yaml", tmp_path, "tiny-sharer", ["tiny-receiver"], benchmark="gsm8k",
                           limit=3)


def write_records(out, key, correct):
    path = records_path(out, key, "arc-challenge")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": str(i), "correct": c}) + "\n" for i, c in enumerate(correct)))


def test_rows_against_a_hand_computation(tmp_path):
    outs = {"org/receiver-a": tmp_path / "a", "receiver-b": tmp_path / "b"}
    write_records(outs["org/receiver-a"], "receiver", [True, False, False, False])
    write_records(outs["org/receiver-a"], "c2c_s1", [True, True, True, False])
    write_records(outs["org/receiver-a"], "c2c_s2", [False, False, False, False])
    write_records(outs["org/receiver-a"], "c2c_all", [True, True, True, True])
    for key in ("receiver", "c2c_s1", "c2c_s2", "c2c_all"):
        write_records(outs["receiver-b"], key, [True, True, False, False])
    rows = {r["sharers"]: r for r in latent_rows(outs, ["hub/s1", "s2"], benchmark="arc-challenge")}
    assert list(rows) == ["none", "s1", "s2", "all"]
    assert rows["none"]["receiver-a"] == 25.0 and "receiver-a_gain" not in rows["none"]
    assert rows["s1"]["receiver-a"] == 75.0 and rows["s1"]["receiver-a_gain"] == 50.0
    assert rows["s1"]["receiver-a_gain_p"] == 0.5  # two discordant items, both for C2C
    assert rows["s2"]["receiver-a_gain"] == -25.0 and rows["all"]["receiver-a"] == 100.0
    assert rows["all"]["receiver-b_gain"] == 0.0 and rows["all"]["receiver-b_gain_p"] == 1.0
    assert rows["none"]["receiver-a_low"] < 25.0 < rows["none"]["receiver-a_high"] and rows["none"]["receiver-a_n"] == 4


def bf16_training(folder):
    """Joint training under bf16 autocast (what a GPU run uses) on this machine's device: finite losses, every
    pair exported."""
    out = train_latent("configs/train_tiny.yaml", *PAIR, 8, folder, {**TRAIN, "max_steps": 2, "precision": "bf16"},
                       progress=False)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(math.isfinite(v) for entry in log for v in entry["loss"].values())
    assert len(list((out / "pairs").iterdir())) == 4


def test_bf16_training(tmp_path):
    bf16_training(tmp_path / "bf16")


def test_training_from_stored_prompt_caches_ends_with_the_online_weights(tmp_path):
    finals = {}
    for cached in (False, True):
        out = train_latent("configs/train_tiny.yaml", *PAIR, 8, tmp_path / f"cached-{cached}",
                           {**TRAIN, "checkpoint_every": 0, "prefix_cache": cached}, progress=False)
        finals[cached] = LatentSystem.from_pretrained(out / "final").state_dict()
        assert (out / "prompt_caches.json").is_file() == cached
    stores = json.loads((tmp_path / "cached-True" / "prompt_caches.json").read_text())
    assert sorted(stores) == sorted(PAIR[0]) and all(store["sequences"] > 0 for store in stores.values())
    for name, weight in finals[False].items():
        torch.testing.assert_close(finals[True][name], weight, rtol=1e-4, atol=1e-6, msg=name)
