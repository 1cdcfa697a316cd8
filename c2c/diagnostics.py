"""Why a fuser helps a receiver, or does not: its training curve, its gates and dynamic weights on real
prompts, and which items its gain comes from.

The numbers issue 14 asks for when a fuser falls short: loss curves, gate logits and the fraction open at
inference, the mean dynamic weight per layer, and whether the sharer alone answers the items C2C gets right.
Everything here reads what training and evaluation left (``log.jsonl``, per-item records) or runs the fuser
on prompts without changing it.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from c2c.analysis import gate_table
from c2c.checkpoint import load_fuser
from c2c.data import IGNORE_INDEX, collate_examples
from c2c.fused import pad_token_id
from c2c.jsonl import read_jsonl
from c2c.paths import repo_relative
from c2c.records import config_items, config_methods, correct_by_id, fused_inputs, method_records


def training_curve(run_dir: str | os.PathLike) -> dict:
    """Train and held-out loss of a ``c2c.train`` run: the logged points and a summary."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a c2c.train run folder")
    records = read_jsonl(path, fix=f"delete the torn line of {path}")
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    held_out = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not held_out:
        raise ValueError(f"{path} holds no losses")
    return {
        "train": train, "eval": held_out,
        "first_train_loss": train[0][1] if train else None, "last_train_loss": train[-1][1] if train else None,
        "first_eval_loss": held_out[0][1] if held_out else None, "last_eval_loss": held_out[-1][1] if held_out else None,
        "min_eval_loss": min(v for _, v in held_out) if held_out else None,
        "elapsed_s": max((r.get("elapsed_s", 0.0) for r in records), default=None),
    }


@torch.no_grad()
def answer_token_losses(model, examples: Sequence, batch_size: int = 8) -> dict:
    """Mean cross-entropy of the receiver at each position of the answer turn of tokenized training examples
    (``c2c.data.ChatExample``), as the training loss scores them, and how often the first answer token is the
    receiver's top-1. With an answer prefix such as "The correct answer is", position 0 is the answer letter
    and the later positions are "." and the end of the turn: a fuser can lower the training loss by fixing
    the format alone, which this tells apart.

    model: a ``c2c.fused.C2CModel`` (its gates closed: the receiver alone). Returns {"cross_entropy":
    [mean per position], "examples": [count per position], "first_token_top1": fraction}.
    """
    if not examples:
        raise ValueError("no examples to score")
    sums, counts, top1 = [], [], 0
    sharer_pads = [pad_token_id(t) for t in model.sharer_tokenizers]
    for start in range(0, len(examples), batch_size):
        batch = collate_examples(examples[start:start + batch_size], pad_token_id(model.receiver_tokenizer),
                                 sharer_pads).to(model.receiver.device)
        logits = model(batch.inputs, batch.continuation_ids[:, :-1], batch.continuation_mask[:, :-1])  # (B, R, V)
        losses = F.cross_entropy(logits.double().transpose(1, 2), batch.labels, reduction="none")  # (B, R)
        scored = batch.labels != IGNORE_INDEX
        for position in range(losses.shape[1]):
            if position == len(sums):
                sums.append(0.0)
                counts.append(0)
            sums[position] += float(losses[:, position][scored[:, position]].sum())
            counts[position] += int(scored[:, position].sum())
        top1 += int((logits[:, 0].argmax(-1) == batch.labels[:, 0]).sum())
    return {"cross_entropy": [s / c for s, c in zip(sums, counts)], "examples": counts,
            "first_token_top1": top1 / len(examples)}


@torch.no_grad()
def dynamic_weights(method, items: Sequence) -> list[dict]:
    """Per receiver layer: gate logits, open at inference, and the mean dynamic weight alpha of the K and V
    paths over every prompt position and receiver head of these items (one item per forward, so no padding
    enters the means), and the effective scale gate * alpha that multiplies the projected sharer cache.

    method: a ``c2c.methods.C2C`` with one sharer; items: benchmark items (``MCItem``).
    """
    fuser = method.model.fusers[0]
    if not hasattr(fuser, "weight_head"):
        raise ValueError(f"this fuser (variant {fuser.config.variant!r}) has no dynamic weights")
    totals = torch.zeros(2 * fuser.config.receiver_layers, dtype=torch.float64)  # (G,): K and V of each layer
    count = 0

    def accumulate(module, args, output):  # output: (G, M, Hr) logits of alpha
        nonlocal count
        alpha = torch.sigmoid(output.double())
        totals.add_(alpha.sum(dim=(1, 2)).cpu())
        count += alpha.shape[1] * alpha.shape[2]

    handle = fuser.weight_head.register_forward_hook(accumulate)
    try:
        for item in items:
            method.model.prefill(fused_inputs(method, [item]))
    finally:
        handle.remove()
    if count == 0:
        raise ValueError("no items: dynamic weights need at least one prompt")
    means = (totals / count).view(-1, 2)  # (L, 2): K, V
    rows = gate_table(fuser) if hasattr(fuser, "gate_logit") else [
        {"layer": t, "key_logit": None, "value_logit": None, "key_open": True, "value_open": True}
        for t in range(means.shape[0])]
    for row, (key_alpha, value_alpha) in zip(rows, means.tolist()):
        row.update(key_alpha=key_alpha, value_alpha=value_alpha,
                   key_scale=key_alpha * row["key_open"], value_scale=value_alpha * row["value_open"])
    return rows


def gain_sources(out: str | os.PathLike, benchmark: str, c2c: str = "c2c", receiver: str = "receiver",
                 sharer: str = "sharer") -> dict:
    """Where C2C's gain over the receiver comes from, on the items all three methods answered.

    gained: C2C right, receiver wrong; of those, sharer_right_on_gained. lost: C2C wrong, receiver right.
    receiver_wrong, sharer_right_on_receiver_wrong: the base rate to hold sharer_right_on_gained against (a fuser
    that gains items at random among the receiver's misses finds the sharer right on this share of them).
    agrees_with_sharer / agrees_with_receiver: fraction of items whose predicted letter equals that method's.
    """
    records = {key: {r["id"]: r for r in method_records(out, key, benchmark)} for key in (c2c, receiver, sharer)}
    ids = sorted(set(records[c2c]) & set(records[receiver]) & set(records[sharer]))
    if not ids:
        raise ValueError(f"{c2c}, {receiver} and {sharer} have no item of {benchmark} in common in {out}")
    right = {key: correct_by_id([records[key][i] for i in ids]) for key in records}
    gained = [i for i in ids if right[c2c][i] and not right[receiver][i]]
    lost = [i for i in ids if not right[c2c][i] and right[receiver][i]]
    receiver_wrong = [i for i in ids if not right[receiver][i]]

    def agreement(other: str) -> float:
        return sum(records[c2c][i].get("pred") == records[other][i].get("pred") for i in ids) / len(ids)

    return {"benchmark": benchmark, "items": len(ids), "gained": len(gained), "lost": len(lost),
            "sharer_right_on_gained": sum(right[sharer][i] for i in gained),
            "sharer_right_on_lost": sum(right[sharer][i] for i in lost), "receiver_wrong": len(receiver_wrong),
            "sharer_right_on_receiver_wrong": sum(right[sharer][i] for i in receiver_wrong),
            "agrees_with_sharer": agreement(sharer), "agrees_with_receiver": agreement(receiver)}


def gate_summary(fuser_folder: str | os.PathLike) -> dict:
    """How many K and V gates of a saved fuser are open at inference, and the largest |gate logit|."""
    rows = gate_table(load_fuser(fuser_folder))
    return {"layers": len(rows), "key_open": sum(r["key_open"] for r in rows),
            "value_open": sum(r["value_open"] for r in rows),
            "max_abs_logit": max(max(abs(r["key_logit"]), abs(r["value_logit"])) for r in rows)}


def open_all_gates(fuser_folder: str | os.PathLike, out_folder: str | os.PathLike) -> Path:
    """Save a copy of a fuser with every gate open at inference (gate logits +1), all else unchanged: what its
    projection does where its gates keep it out. Returns the copy's folder (evaluate it like any fuser)."""
    fuser = load_fuser(fuser_folder)
    with torch.no_grad():
        fuser.gate_logit.fill_(1.0)
    return fuser.save_pretrained(out_folder)


def fuser_report(run: str | os.PathLike, eval_out: str | os.PathLike, benchmark: str, key: str) -> dict:
    """One trained fuser, diagnosed: its run's loss summary and held-out losses, its gates (``gate_summary``) and
    where its C2C method ``key`` of the evaluation in ``eval_out`` gains and loses (``gain_sources``)."""
    curve = training_curve(run)
    return {"run": repo_relative(run), "training": {k: v for k, v in curve.items() if k not in ("train", "eval")},
            "eval_losses": curve["eval"], "gates": gate_summary(Path(run) / "final"),
            "gain_sources": gain_sources(eval_out, benchmark, c2c=key)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Diagnose trained fusers from their runs and evaluation records: "
                                                 "loss curves, gates, where the gain comes from; with --eval-config, "
                                                 "also the mean dynamic weights per layer on real prompts.")
    parser.add_argument("--eval-out", required=True, help="the evaluation's output folder (results/<profile>/...)")
    parser.add_argument("--benchmark", default="arc-challenge")
    parser.add_argument("--fuser", action="append", required=True, metavar="KEY=RUN_FOLDER",
                        help="a C2C method key of the evaluation and its c2c.train run folder (repeatable)")
    parser.add_argument("--out", help="JSON file to write (default: <eval-out>/diagnostics.json)")
    parser.add_argument("--eval-config", help="the evaluation's config: builds each fuser's C2C method (its models "
                                              "and prompt caches) to measure its dynamic weights")
    parser.add_argument("--weight-items", type=int, default=64,
                        help="benchmark items (the first of the config's) for the dynamic weights")
    parser.add_argument("--all-gates-open", metavar="FOLDER",
                        help="also save FOLDER/<run folder name>: each fuser with every gate open (open_all_gates)")
    args = parser.parse_args(argv)
    report = {}
    for spec in args.fuser:
        key, sep, run = spec.partition("=")
        if not sep:
            parser.error(f"--fuser {spec!r}: use KEY=RUN_FOLDER")
        if args.all_gates_open:
            print(f"{key}: every gate open -> {open_all_gates(Path(run) / 'final', Path(args.all_gates_open) / Path(run).name)}")
        report[key] = fuser_report(run, args.eval_out, args.benchmark, key)
        if args.eval_config:
            method = config_methods(args.eval_config, [key], fuser_checkpoint=Path(run) / "final")[key]
            items = config_items(args.eval_config, args.benchmark, args.eval_out, limit=args.weight_items)
            rows = dynamic_weights(method, items)
            report[key]["dynamic_weights"] = {
                "items": len(items), "layers": rows,
                "mean_key_alpha": sum(r["key_alpha"] for r in rows) / len(rows),
                "mean_value_alpha": sum(r["value_alpha"] for r in rows) / len(rows),
                "mean_key_scale": sum(r["key_scale"] for r in rows) / len(rows),
                "mean_value_scale": sum(r["value_scale"] for r in rows) / len(rows)}
    out = Path(args.out or Path(args.eval_out) / "diagnostics.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
