"""Training cost: loss curves and checkpoint times from a real tiny run, and the file-time fallback."""

import json
import os

import pytest

from c2c.train import read_log, train
from c2c.training_cost import checkpoint_times, loss_curves, smooth
from conftest import make_fuser


def test_a_tiny_runs_checkpoints_with_their_logged_time(tmp_path):
    run = tmp_path / "run"
    train({"receiver": "tiny-receiver", "sharer": "tiny-sharer", "dataset": "synthetic:facts", "max_examples": 48,
           "max_length": 256, "eval_fraction": 0.1, "fuser": {"hidden_dim": 16, "intermediate_dim": 16},
           "batch_size": 4, "max_steps": 6, "precision": "fp32", "eval_every": 3, "log_every": 2,
           "checkpoint_every": 2, "output_dir": str(run), "progress": False})
    log = read_log(run)
    curves = loss_curves(log)
    assert [c["step"] for c in curves] == [0, 2, 3, 4, 6]
    assert curves[0]["train_loss"] is None and curves[0]["eval_loss"] is not None  # step 0: evaluation only
    assert curves[1]["train_loss"] is not None and curves[1]["eval_loss"] is None
    rows = checkpoint_times(run)
    assert [(r["step"], os.path.basename(r["folder"])) for r in rows] == [
        (2, "checkpoint-000002"), (4, "checkpoint-000004"), (6, "final")]
    logged = {r["step"]: r["elapsed_s"] for r in log}
    assert all(r["time_source"] == "log" and r["elapsed_s"] == logged[r["step"]] for r in rows)
    assert rows[0]["elapsed_s"] < rows[1]["elapsed_s"] < rows[2]["elapsed_s"]


def test_a_log_without_elapsed_time_falls_back_to_file_times(tmp_path, tiny_receiver, tiny_sharer):
    run = tmp_path / "run"
    (run / "checkpoint-000050").mkdir(parents=True)
    fuser = make_fuser(tiny_receiver[0], tiny_sharer[0])
    fuser.save_pretrained(run / "checkpoint-000050")
    fuser.save_pretrained(run / "final")
    (run / "log.jsonl").write_text("".join(json.dumps({"step": s, "train_loss": 1.0 / (s + 1)}) + "\n"
                                           for s in (10, 50, 100)))
    (run / "data_stats.json").write_text("{}")
    os.utime(run / "data_stats.json", (1000.0, 1000.0))
    os.utime(run / "checkpoint-000050" / "model.safetensors", (1600.0, 1600.0))
    os.utime(run / "final" / "model.safetensors", (2200.0, 2200.0))
    rows = checkpoint_times(run)
    assert [(r["step"], r["elapsed_s"], r["time_source"]) for r in rows] == [(50, 600.0, "file times"),
                                                                               (100, 1200.0, "file times")]
    (run / "checkpoint-000050" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        checkpoint_times(run)
    (run / "log.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no records: train the fuser"):
        checkpoint_times(run)
    with pytest.raises(FileNotFoundError, match="holds no training run"):
        checkpoint_times(tmp_path / "nothing")


def test_smoothing():
    assert smooth([1.0, 2.0, 3.0], weight=0.0) == [1.0, 2.0, 3.0]
    assert smooth([2.0, 2.0, 2.0], weight=0.9) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no ramp from 0
    assert smooth([0.0, 1.0], weight=0.5) == pytest.approx([0.0, 0.5 / 0.75])
    with pytest.raises(ValueError):
        smooth([1.0], weight=1.0)
