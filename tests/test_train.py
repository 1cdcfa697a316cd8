"""Fuser training: loss, optimiser groups, schedule, exact resume, logs, errors, and real knowledge transfer."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from c2c.checkpoint import load_fuser
from c2c.data import collate_examples, load_conversations, tokenize_chats
from c2c.fused import C2CModel
from c2c.fuser import FuserConfig, gate_temperature
from c2c.train import checkpoints, continuation_loss, linear_schedule, main, optimizer_groups, read_log, train
from c2c.train_config import TrainConfig, load_train_config, parse_args, run_fields
from c2c.transfer import run_knowledge_transfer
from conftest import make_fuser

REPO = Path(__file__).resolve().parent.parent



def tiny_run(tmp_path, name="run", **overrides) -> dict:
    """A few-second run on the tiny pair (different tokenizers), checkpoints every 2 steps."""
    config = {
        "receiver": "tiny-receiver", "sharer": "tiny-sharer", "dataset": "synthetic:facts", "max_examples": 64,
        "max_length": 256, "eval_fraction": 0.1, "fuser": {"hidden_dim": 16, "intermediate_dim": 16},
        "learning_rate": 1e-2, "batch_size": 4, "grad_accum": 2, "max_steps": 6, "precision": "fp32",
        "eval_every": 2, "log_every": 1, "checkpoint_every": 2, "output_dir": str(tmp_path / name), "progress": False,
    }
    config.update(overrides)
    return config


# ---- the loss ------------------------------------------------------------------------------------


def test_continuation_loss_equals_cross_entropy_on_forward_logits(tiny_receiver, tiny_sharer):
    receiver, receiver_tok = tiny_receiver
    sharer, sharer_tok = tiny_sharer
    fuser = make_fuser(receiver, sharer, seed=1, gate_logit=1.0)
    model = C2CModel(receiver, receiver_tok, [sharer], [sharer_tok], [fuser])
    data = tokenize_chats(load_conversations("synthetic:facts", 3) + [[
        {"role": "user", "content": "Tell me a longer story please."},
        {"role": "assistant", "content": "Once upon a time there was a spider with eight legs."}]],
        receiver_tok, [sharer_tok], progress=False)
    batch = collate_examples([data[i] for i in range(4)], receiver_tok.pad_token_id, [sharer_tok.pad_token_id])
    assert (batch.continuation_mask == 0).any()  # really right-padded
    with torch.no_grad():
        logits = model(batch.inputs, batch.continuation_ids[:, :-1], batch.continuation_mask[:, :-1])  # (B, R, V)
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="sum")
        loss = continuation_loss(model, batch)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    assert batch.num_label_tokens == sum(len(data[i].continuation_ids) for i in range(4))


# ---- configuration -------------------------------------------------------------------------------


def test_unknown_config_keys_are_named_with_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['learning_rat'\]; valid keys: .*'learning_rate'"):
        load_train_config({"learning_rat": 1e-4})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['hidden'\] under 'fuser'; valid keys: \[.*'hidden_dim'"):
        load_train_config({"fuser": {"hidden": 3}})
    with pytest.raises(ValueError, match="unknown config key 'optim.lr'"):
        load_train_config({}, overrides={"optim.lr": 1})
    with pytest.raises(ValueError, match="config key 'batch_size': cannot use 'four' as int"):
        load_train_config({"batch_size": "four"})
    with pytest.raises(ValueError, match="precision must be one of"):
        load_train_config({"precision": "fp8"})
    config = load_train_config({"learning_rate": "1e-4"}, overrides={"fuser.hidden_dim": 8, "max_steps": "3"})
    assert config.learning_rate == 1e-4 and config.fuser == {"hidden_dim": 8} and config.max_steps == 3


def test_command_line_overrides(tmp_path):
    path, overrides = parse_args(["--config", "x.yaml", "--learning_rate", "3e-4", "--fuser.dropout=0.0",
                                  "--max-steps", "5", "--resume_from", "null"])
    assert path == "x.yaml"
    assert overrides == {"learning_rate": "3e-4", "fuser.dropout": 0.0, "max_steps": 5, "resume_from": None}
    assert load_train_config({}, overrides).learning_rate == 3e-4


def test_shipped_configs_are_valid_and_the_paper_one_is_the_recipe():
    tiny = load_train_config(REPO / "configs" / "train_tiny.yaml")
    assert tiny.dataset == "synthetic:facts" and tiny.precision == "fp32"
    paper = load_train_config(REPO / "configs" / "train_paper.yaml")
    assert (paper.receiver, paper.sharer) == ("Qwen/Qwen3-0.6B", "Qwen/Qwen2.5-0.5B-Instruct")
    assert (paper.dataset, paper.max_examples, paper.max_length, paper.eval_fraction) == (
        "teknium/OpenHermes-2.5", 500_000, 2048, 0.01)
    assert (paper.learning_rate, paper.weight_decay, paper.warmup_ratio, paper.max_grad_norm) == (1e-4, 0.01, 0.1, 1.0)
    assert (paper.batch_size, paper.grad_accum, paper.epochs, paper.seed) == (4, 8, 1, 42)
    assert (paper.precision, paper.eval_every, paper.checkpoint_every) == ("bf16", 100, 500)
    assert paper.fuser["anneal_steps"] == "total" and paper.fuser["exempt_gates_from_weight_decay"] is True
    assert paper.fuser["hidden_dim"] == 1024 and paper.fuser["num_layers"] == 3 and paper.fuser["dropout"] == 0.1
    # the exemption is a fix a config names; the trainer's default is the paper's (decayed gate logits)
    assert TrainConfig().fuser == {} and FuserConfig.exempt_gates_from_weight_decay is False
    for name in ("train_tiny", "train_small", "train_small_cross", "train_transfer_small"):
        assert load_train_config(REPO / "configs" / f"{name}.yaml").fuser["exempt_gates_from_weight_decay"] is True, name


# ---- optimiser -----------------------------------------------------------------------------------


@pytest.mark.parametrize("exempt", [True, False])
def test_gate_logits_are_excluded_from_weight_decay(tiny_receiver, tiny_sharer, exempt):
    fuser = make_fuser(tiny_receiver[0], tiny_sharer[0], gate_logit=2.0, exempt_gates_from_weight_decay=exempt)
    groups = optimizer_groups(fuser, 0.5)
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(by_id) == len(list(fuser.parameters()))
    assert by_id[id(fuser.gate_logit)] == (0.0 if exempt else 0.5)
    assert all(wd == 0.5 for p, wd in ((p, by_id[id(p)]) for p in fuser.parameters()) if p is not fuser.gate_logit)
    # behaviour: with zero gradients AdamW only decays, so decoupled decay moves exactly the decayed tensors
    optimizer = torch.optim.AdamW(groups, lr=0.1)
    for p in fuser.parameters():
        p.grad = torch.zeros_like(p)
    before = fuser.input.weight.detach().clone()
    optimizer.step()
    assert torch.allclose(fuser.input.weight, before * (1 - 0.1 * 0.5))
    expected_gate = 2.0 if exempt else 2.0 * (1 - 0.1 * 0.5)
    assert torch.allclose(fuser.gate_logit, torch.full_like(fuser.gate_logit, expected_gate))


def test_linear_schedule_warms_up_then_decays():
    f = linear_schedule(total_steps=20, warmup_steps=2)
    assert [f(s) for s in (0, 1, 2, 11, 20, 25)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]


# ---- runs ----------------------------------------------------------------------------------------


def test_training_runs_logs_and_saves_a_loadable_fuser(tmp_path, tiny_receiver, tiny_sharer):
    receiver, sharer = tiny_receiver[0], tiny_sharer[0]
    frozen = {name: p.detach().clone() for name, p in receiver.named_parameters()}
    seen = []

    def watch(step, info):
        fuser, model = info["fuser"], info["model"]
        config = fuser.config
        seen.append((step, info["temperature"], info["lr"]))
        # tau follows the schedule per optimizer step (not per micro-batch: grad_accum is 2)
        assert info["temperature"] == pytest.approx(
            gate_temperature(step, config.initial_temperature, config.final_temperature, config.anneal_steps), rel=1e-6)
        assert fuser.training and not model.receiver.training and not model.sharers[0].training
        assert all(p.grad is None and not p.requires_grad for p in model.receiver.parameters())
        assert all(p.grad is None and not p.requires_grad for p in model.sharers[0].parameters())
        assert all(p.grad is None for p in fuser.parameters())  # zeroed after each step (set_to_none)
        assert step == 1 or fuser.gate_logit.detach().abs().max() > 0  # it trains (step 1 has lr 0: warm-up)
        # by default the trainer decays every weight, the gate logits included (the paper's reference)
        decay = {id(p): g["weight_decay"] for g in info["optimizer"].param_groups for p in g["params"]}
        assert decay[id(fuser.gate_logit)] == 0.01 and set(decay.values()) == {0.01}

    final = train(tiny_run(tmp_path, max_steps=5, checkpoint_every=2, eval_every=2, log_every=2,
                           fuser={"hidden_dim": 16, "intermediate_dim": 16, "anneal_steps": "total"}), on_step=watch)
    assert [s for s, _, _ in seen] == [1, 2, 3, 4, 5]
    assert seen[-1][1] == pytest.approx(0.001, rel=1e-5)  # annealed over the run's 5 steps
    # lr: linear warm-up (ceil(10% of 5) = 1 step from 0), then linear decay
    assert [lr for _, _, lr in seen] == pytest.approx([0.0, 1e-2, 0.75e-2, 0.5e-2, 0.25e-2])
    run = tmp_path / "run"
    assert final == run / "final"
    assert [p.name for p in checkpoints(run)] == ["checkpoint-000002", "checkpoint-000004"]
    for name, p in receiver.named_parameters():
        assert torch.equal(p, frozen[name])  # the frozen receiver did not move
    fuser = load_fuser(final, receiver.config, sharer.config)
    assert not torch.equal(fuser.gate_logit, torch.zeros_like(fuser.gate_logit))
    assert fuser.config.anneal_steps == 5 and fuser.config.sharer == "tiny-sharer"
    assert fuser.config.exempt_gates_from_weight_decay is False  # recorded in the checkpoint
    # log: step 0 (eval, gates closed = receiver alone), train every 2 steps, eval every 2 and at the end
    log = read_log(run)
    assert [r["step"] for r in log] == [0, 2, 4, 5]
    assert [("train_loss" in r, "eval_loss" in r) for r in log] == [(False, True), (True, True), (True, True),
                                                                    (True, True)]
    for record in log:
        assert set(record) >= {"step", "epoch", "lr", "temperature", "gate_logits"}
        assert len(record["gate_logits"]) == 4 and all(len(pair) == 2 for pair in record["gate_logits"])
        assert all(math.isfinite(record[k]) and record[k] > 0 for k in ("train_loss", "eval_loss") if k in record)
    assert log[0]["gate_logits"] == [[0.0, 0.0]] * 4
    assert log[-1]["gate_logits"] == fuser.gate_logit.view(-1, 2).tolist()
    assert log[-1]["temperature"] == pytest.approx(0.001, rel=1e-5)
    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["train_examples"] + stats["eval_examples"] == stats["examples"] == 64
    assert stats["sequences_per_step"] == 8 and stats["total_steps"] == 5


def test_a_killed_run_resumes_exactly(tmp_path):
    """Interrupted after step 3 (checkpoint at 2), resumed: the same weights, bit for bit, and the same log.

    Dropout and Gumbel gate noise are on, batches are shuffled and accumulated over 2 micro-batches:
    every RNG stream, the optimizer, the schedule and the data position must come back exactly.
    """
    fuser_options = {"hidden_dim": 16, "intermediate_dim": 16, "dropout": 0.1}
    straight = train(tiny_run(tmp_path, "straight", fuser=fuser_options))

    class Killed(Exception):
        pass

    def kill(step, info):
        if step == 3:
            raise Killed

    config = tiny_run(tmp_path, "interrupted", fuser=fuser_options)
    with pytest.raises(Killed):
        train(config, on_step=kill)
    assert [p.name for p in checkpoints(tmp_path / "interrupted")] == ["checkpoint-000002"]
    assert read_log(tmp_path / "interrupted")[-1]["step"] == 3  # logged past the checkpoint
    resumed = train(config)
    a = load_fuser(straight).state_dict()
    b = load_fuser(resumed).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    timing = ("tokens_per_s", "elapsed_s")  # wall-clock: differs between runs
    strip = lambda log: [{k: v for k, v in r.items() if k not in timing} for r in log]  # noqa: E731
    assert strip(read_log(tmp_path / "straight")) == strip(read_log(tmp_path / "interrupted"))
    # wall-clock: every record has it, and the resumed run counts on from its checkpoint's elapsed time
    elapsed = [r["elapsed_s"] for r in read_log(tmp_path / "interrupted")]
    assert all(b >= a > 0 for a, b in zip(elapsed, elapsed[1:])), elapsed
    # a finished run is not trained again
    assert train(config) == resumed


@pytest.mark.parametrize("master", [True, False])
def test_bf16_autocast_with_or_without_fp32_master_weights(tmp_path, master):
    """bf16 (here on CPU): frozen models in bf16 under autocast; the fuser trains in fp32 or in pure bf16."""
    final = train(tiny_run(tmp_path, max_steps=2, precision="bf16", fp32_master_weights=master, eval_every=0))
    fuser = load_fuser(final)
    assert fuser.input.weight.dtype == (torch.float32 if master else torch.bfloat16)
    log = read_log(tmp_path / "run")
    assert math.isfinite(log[-1]["train_loss"]) and math.isfinite(log[-1]["eval_loss"])
    assert any(g != 0 for pair in log[-1]["gate_logits"] for g in pair)


def test_messages_name_the_run_relative_to_the_repository(tmp_path, capsys, monkeypatch):
    """What train prints lands in executed notebooks: a run inside the repository is named repo-relative (the same on
    every machine), not by this machine's absolute path."""
    monkeypatch.setattr("c2c.paths.REPO_ROOT", tmp_path)
    config = tiny_run(tmp_path, max_steps=2, eval_every=0)
    train(config)
    train(config)
    shown = capsys.readouterr().out
    assert "c2c.train: done, 2 steps; final fuser in run/final\n" in shown
    assert "c2c.train: run already holds the finished run; final fuser in run/final\n" in shown
    assert str(tmp_path) not in shown


def test_a_folder_holding_another_run_is_refused(tmp_path):
    config = tiny_run(tmp_path, max_steps=2)
    train(config)
    with pytest.raises(ValueError, match=r"holds a different training run; differing config keys: learning_rate: "
                                         r"0.01 -> 0.02"):
        train({**config, "learning_rate": 2e-2})
    train({**config, "progress": True, "checkpoint_every": 1})  # bookkeeping keys may differ: finished, returns
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no training run"):
        train(tiny_run(tmp_path, "other"))


def test_resuming_from_a_checkpoint_of_another_pair_is_refused(tmp_path):
    train(tiny_run(tmp_path, "self", sharer="tiny-receiver", max_steps=3))
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint-000002: it was trained for receiver "
                                         r"'tiny-receiver' <- sharer 'tiny-receiver'.*sharer num_key_value_heads"):
        train(tiny_run(tmp_path, "pair", resume_from=str(tmp_path / "self" / "checkpoint-000002")))


def test_a_dataset_without_the_expected_fields_is_refused(tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n")
    with pytest.raises(ValueError, match=r"chats\.jsonl, record 0: missing field 'conversations'"):
        train(tiny_run(tmp_path, dataset=str(data)))


def test_command_line_entry_point(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_run(tmp_path, "cli")))
    main(["--config", str(config), "--max_steps", "1", "--eval_every", "0", "--fuser.hidden_dim", "8"])
    saved = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    assert saved["max_steps"] == 1 and saved["fuser"]["hidden_dim"] == 8
    assert load_fuser(tmp_path / "cli" / "final").config.hidden_dim == 8
    with pytest.raises(SystemExit, match="usage"):
        main([])


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_keys_and_trains_nothing(flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main([flag])
    shown = capsys.readouterr().out
    assert shown.startswith("usage: python -m c2c.train --config") and "learning_rate" in shown
    assert "sharer_mlp_layers" in shown and not any(tmp_path.iterdir())


# ---- training does something real ----------------------------------------------------------------


def test_fuser_transfers_knowledge_only_the_sharer_has(tmp_path):
    """configs/train_tiny.yaml: questions about invented people's favourite colours (8 colours).

    The sharer (a copy of the tiny receiver fine-tuned on all the facts) knows them; the receiver (fine-tuned
    on the same kind of question about other people) knows the format only; the fuser trains on 90% of the
    facts. On the held-out 10% (30 questions), the trained fuser must beat the receiver alone (step 0: gates
    closed) and a fuser trained identically with the *untrained* sharer: the gain comes from the sharer.
    """
    rows = {row["setting"]: row for row in run_knowledge_transfer(REPO / "configs" / "train_tiny.yaml", tmp_path,
                                                                   progress=False)}
    receiver, sharer = rows["receiver alone"], rows["sharer alone (knows the facts)"]
    control, c2c = rows["C2C, sharer before fine-tuning (control)"], rows["C2C"]
    print({name: (row["held_out_loss"], row["answer_accuracy"]) for name, row in rows.items()})
    assert read_log(tmp_path / "control")[0]["eval_loss"] == pytest.approx(receiver["held_out_loss"])  # same split
    assert sharer["answer_accuracy"] >= 0.9  # the fine-tuned sharer knows the held-out facts
    assert c2c["held_out_loss"] < receiver["held_out_loss"] - 0.08
    assert c2c["held_out_loss"] < control["held_out_loss"] - 0.08
    def right(row):  # held-out questions answered right (accuracies are fp32 fractions of 30)
        return round(row["answer_accuracy"] * 30)

    assert right(c2c) >= right(receiver) + 6 and right(c2c) >= right(control) + 6  # >= 0.2 of the 30 held out
    assert load_fuser(tmp_path / "expert" / "final").open_gates().any()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("train_*.yaml")), ids=lambda p: p.name)
def test_every_shipped_train_config_loads(path):
    assert load_train_config(path).output_dir


def test_the_complex_fuser_config_differs_from_the_main_run_only_in_the_fuser_mlp_and_batch_split():
    main = load_train_config(REPO / "configs" / "train_small_mc.yaml")
    complex_run = load_train_config(REPO / "configs" / "train_small_mc_complex.yaml")
    assert complex_run.fuser == {**main.fuser, "sharer_mlp_layers": 3}
    # the same examples per optimizer step, split in accumulated halves to fit 24 GB
    assert complex_run.batch_size * complex_run.grad_accum == main.batch_size * main.grad_accum
    assert complex_run.grad_accum > main.grad_accum
    assert run_fields(dataclasses.replace(complex_run, fuser=main.fuser, batch_size=main.batch_size,
                                          grad_accum=main.grad_accum)) == run_fields(main)


def test_the_longer_complex_fuser_run_differs_from_it_only_in_epochs():
    complex_run = load_train_config(REPO / "configs" / "train_small_mc_complex.yaml")
    longer = load_train_config(REPO / "configs" / "train_small_mc_complex_4epochs.yaml")
    assert longer.epochs == 2 * complex_run.epochs and longer.output_dir != complex_run.output_dir
    assert run_fields(dataclasses.replace(longer, epochs=complex_run.epochs)) == run_fields(complex_run)


def test_the_gemma_sharer_run_differs_from_the_smollm2_run_only_in_the_sharer():
    smollm = load_train_config(REPO / "configs" / "train_small_mc_smollm.yaml")
    gemma = load_train_config(REPO / "configs" / "train_small_mc_gemma.yaml")
    assert gemma.sharer == "offline:gemma-3-270m" and gemma.output_dir != smollm.output_dir
    assert run_fields(dataclasses.replace(gemma, sharer=smollm.sharer)) == run_fields(smollm)


@pytest.mark.parametrize("profile", ["tiny", "small", "paper"])
def test_notebook_03s_run_keeps_every_checkpoint_for_table_12(profile):
    """Table 12 (notebook 15) scores the checkpoints of notebook 03's run; other runs may keep only the newest."""
    params = yaml.safe_load((REPO / "params" / f"{profile}.yaml").read_text())
    assert params["cost_checkpoint_runs"]
    assert load_train_config(REPO / params["train_config"]).keep_checkpoints is None


@pytest.mark.parametrize("name", ["train_small_mc", "train_small_mc_identical"])
def test_the_longer_main_and_control_runs_differ_from_theirs_only_in_epochs(name):
    run = load_train_config(REPO / "configs" / f"{name}.yaml")
    longer = load_train_config(REPO / "configs" / f"{name}_4epochs.yaml")
    assert longer.epochs == 2 * run.epochs and longer.output_dir != run.output_dir
    assert run_fields(dataclasses.replace(longer, epochs=run.epochs)) == run_fields(run)
