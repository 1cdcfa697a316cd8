"""The Single baseline (c2c.single, the paper's Table 6): its loss against transformers' own, a short run that
trains every parameter and lowers the held-out loss, an exact resume, and a finished folder reused only by its
config."""

import json

import pytest
import torch

from c2c import single
from c2c.data import IGNORE_INDEX
from c2c.models import load_model
from c2c.single import RUN_RECORD, loss_sum, single_output_dir, train_single
from c2c.train import read_log, train
from c2c.train_config import load_train_config

TINY = {"receiver_finetune": None, "sharer_finetune": None, "max_examples": 64, "batch_size": 8, "epochs": 1,
        "learning_rate": 3e-3, "eval_fraction": 0.125, "checkpoint_every": 0}


def test_loss_sum_equals_transformers_mean_loss_times_tokens(tiny_receiver):
    model, _ = tiny_receiver
    torch.manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX  # the prompt is not scored
    with torch.no_grad():
        reference = model.double()(input_ids=ids, attention_mask=mask, labels=labels).loss
        model.float()
        ours = loss_sum(model, ids, mask, labels)
    scored = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert scored == 5 + 2 + 5
    assert float(ours) / scored == pytest.approx(float(reference), rel=1e-5)


def test_single_trains_every_parameter_and_lowers_the_held_out_loss(tmp_path):
    out = train_single("configs/train_tiny.yaml", overrides=TINY, output_dir=tmp_path / "single", progress=False)
    record = json.loads((out / RUN_RECORD).read_text())
    reference, _ = load_model("tiny-receiver")
    assert record["trainable_parameters"] == sum(p.numel() for p in reference.parameters())
    assert record["steps"] == (64 - 8) // 8 and record["eval_examples"] == 8
    assert record["eval_loss_after"] < record["eval_loss_before"]
    trained, _ = load_model(out)
    changed = [name for name, p in trained.named_parameters()
               if not torch.equal(p, dict(reference.named_parameters())[name])]
    assert len(changed) == len(list(reference.parameters()))  # every parameter moved
    # the same config finds the finished run; another one is refused
    assert train_single("configs/train_tiny.yaml", overrides=TINY, output_dir=out, progress=False) == out
    with pytest.raises(ValueError, match="another config.*learning_rate"):
        train_single("configs/train_tiny.yaml", overrides={**TINY, "learning_rate": 1e-3}, output_dir=out,
                     progress=False)


def test_a_stopped_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    settings = {**TINY, "max_steps": 4}
    straight = train_single("configs/train_tiny.yaml", overrides=settings, output_dir=tmp_path / "a", progress=False)
    save = single._save

    def save_then_stop(*args):
        save(*args)
        raise KeyboardInterrupt  # the process dies right after its checkpoint at step 2

    monkeypatch.setattr(single, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_single("configs/train_tiny.yaml", overrides={**settings, "checkpoint_every": 2},
                     output_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(single, "_save", save)
    assert not (tmp_path / "b" / RUN_RECORD).exists() and (tmp_path / "b" / single.CHECKPOINT).is_dir()
    resumed = train_single("configs/train_tiny.yaml", overrides={**settings, "checkpoint_every": 2},
                           output_dir=tmp_path / "b", progress=False)
    a, b = load_model(straight)[0].state_dict(), load_model(resumed)[0].state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert not (resumed / single.CHECKPOINT).exists()


def test_before_training_single_is_the_fusers_receiver_on_the_same_held_out_tokens(tmp_path):
    """Same examples, split and scored tokens as the fuser's run (whose step-0 evaluation, gates closed, is the
    receiver alone), from the same fine-tuned receiver copy: the two held-out losses agree."""
    settings = {"max_examples": 64, "batch_size": 8, "max_steps": 1, "eval_fraction": 0.125, "checkpoint_every": 0}
    train("configs/train_tiny.yaml", overrides={**settings, "output_dir": str(tmp_path / "fuser"), "progress": False})
    step0 = next(e for e in read_log(tmp_path / "fuser") if "eval_loss" in e and e["step"] == 0)
    out = train_single("configs/train_tiny.yaml", overrides=settings, output_dir=tmp_path / "single", progress=False)
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["eval_loss_before"] == pytest.approx(step0["eval_loss"], rel=1e-5)


def test_single_sits_beside_the_fuser_run():
    config = load_train_config("configs/train_small_mc.yaml")
    assert single_output_dir(config).as_posix() == "runs/small/mc_fuser_single"


def test_an_evaluation_method_reads_the_single_model(tmp_path, tiny_receiver):
    from c2c.eval_config import load_eval_config
    from c2c.evaluate import run_eval

    folder = train_single("configs/train_tiny.yaml", overrides={**TINY, "max_steps": 2},
                          output_dir=tmp_path / "single", progress=False)
    config = {"name": "single", "receiver": "tiny-receiver", "sharer": "tiny-sharer", "dtype": "float32",
              "device": "cpu", "scoring": "logits", "batch_size": 2,
              "methods": ["receiver", {"name": "receiver", "key": "single", "model": str(folder)}],
              "benchmarks": [{"name": "arc-challenge", "source": "tiny-fixtures", "limit": 3}]}
    ran = run_eval(config, tmp_path / "out", progress=False)
    base, tuned = (ran.results[(k, "arc-challenge")].records for k in ("receiver_logits", "single"))
    assert [r["id"] for r in base] == [r["id"] for r in tuned]
    assert all(a["scores"] != b["scores"] for a, b in zip(base, tuned))  # another model answered
    meta = json.loads((tmp_path / "out" / "eval" / "single" / "arc-challenge.meta.json").read_text())
    assert meta["method"]["model"] == str(folder)
    with pytest.raises(FileNotFoundError, match="does not exist; train it first"):
        load_eval_config({**config, "methods": [{"name": "receiver", "model": "runs/nowhere_single"}]})
    with pytest.raises(ValueError, match="receiver and sharer only"):
        load_eval_config({**config, "fuser": {"random": {}}, "methods": [{"name": "c2c", "model": str(folder)}]})
