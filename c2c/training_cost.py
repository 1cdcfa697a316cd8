"""Training cost against accuracy: the paper's Figure 13 (loss curves) and Table 12 (checkpoints vs time).

A ``c2c.train`` run folder holds ``log.jsonl`` (per logged step: train_loss over the steps since the last
log, eval_loss on the held-out split when evaluated, elapsed_s), ``checkpoint-<step>/`` folders (a fuser
each) and ``final/``. ``loss_curves`` reads the curves; ``checkpoint_times`` lists every saved fuser with
the wall-clock seconds of training it took.

Time source: the log's ``elapsed_s`` (the training loop's wall clock, ``c2c.train``) at the checkpoint's
step. A log written before ``elapsed_s`` existed has none; then the time is read from the files instead
(the checkpoint's ``model.safetensors`` modification time minus that of ``data_stats.json``, written just
before the loop starts) and marked as such: it is right only if the run was never paused or resumed.
"""

from __future__ import annotations

import os
from pathlib import Path

from c2c.train import checkpoints, read_log

FINAL = "final"


def loss_curves(log: list[dict]) -> list[dict]:
    """One row per logged step: step, train_loss and eval_loss (None where not logged), elapsed_s (None if absent)."""
    return [{"step": r["step"], "train_loss": r.get("train_loss"), "eval_loss": r.get("eval_loss"),
             "elapsed_s": r.get("elapsed_s")} for r in log if "train_loss" in r or "eval_loss" in r]


def smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """Exponential moving average (bias-corrected, as TensorBoard's smoothing): weight 0 = the values."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"weight must be in [0, 1), got {weight}")
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def checkpoint_times(run: str | os.PathLike) -> list[dict]:
    """Every saved fuser of a run: step, folder, elapsed_s and time_source ("log" or "file times").

    The final fuser's step is the last logged step. Checkpoint folders without a fuser are an error.
    """
    run = Path(run)
    log = read_log(run)
    if not log:
        raise ValueError(f"{run / 'log.jsonl'} holds no records: train the fuser (notebook 03, or python -m c2c.train "
                         "--config <its config>)")
    logged = {r["step"]: r.get("elapsed_s") for r in log}
    folders = [(int(folder.name.split("-")[1]), folder) for folder in checkpoints(run)]
    if (run / FINAL / "fuser_config.json").is_file():
        folders.append((max(logged), run / FINAL))
    if not folders:
        raise FileNotFoundError(f"{run} holds no checkpoint-* or final/ fuser: train it (checkpoint_every > 0)")
    start = run / "data_stats.json"
    rows = []
    for step, folder in folders:
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing: the checkpoint is incomplete")
        if logged.get(step) is not None:
            elapsed, source = logged[step], "log"
        elif start.is_file():
            elapsed, source = weights.stat().st_mtime - start.stat().st_mtime, "file times"
        else:
            raise FileNotFoundError(f"{run}: no elapsed_s at step {step} in log.jsonl and no data_stats.json to time "
                                    "it from")
        rows.append({"step": step, "folder": str(folder), "elapsed_s": elapsed, "time_source": source})
    return rows
