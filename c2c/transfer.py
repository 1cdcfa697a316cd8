"""The controlled knowledge-transfer benchmark: facts only the sharer has learned.

`configs/train_tiny.yaml` (tiny pair) and `configs/train_transfer_small.yaml` (SmolLM2-135M) build it:
invented people and their favourite colours (`c2c.data.synthetic_facts`, 8 colours, so chance is 1/8).
The sharer is fine-tuned on all facts, the receiver on the same kind of question about other people
(it knows the answer format, not these facts); the fuser trains on part of the facts. Success = on the
held-out facts, the receiver with C2C answers what it cannot answer alone, and better than with a fuser
trained the same way on the sharer before fine-tuning (the control: whatever the fuser itself learns
about the task, such as the colour prior).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

from c2c.checkpoint import load_fuser
from c2c.data import collate_examples, load_tokenized, split_indices
from c2c.fused import C2CModel, position_ids
from c2c.models import load_model
from c2c.train import read_log, train
from c2c.train_config import TrainConfig, load_train_config

ANSWERERS = ("receiver", "sharer", "c2c")


def is_fact_task(config: TrainConfig) -> bool:
    """Whether a training config is the synthetic-facts task (answers checkable by their first token)."""
    return config.dataset.startswith("synthetic:facts")


def held_out_answer_accuracy(run: str | Path, answerers: Sequence[str] = ("c2c",)) -> dict[str, float]:
    """{answerer: share of a training run's held-out questions whose first answer token is its top
    prediction}, the models and data loaded once. Answerers: "c2c" (the receiver after the fused prefix),
    "receiver" (alone: every gate closed) and "sharer" (alone, on its own prompt; needs the receiver's
    vocabulary).

    The facts' answers have distinct first tokens (checked), so the first answer token decides the fact.
    """
    unknown = [a for a in answerers if a not in ANSWERERS]
    if unknown:
        raise ValueError(f"unknown answerers {unknown}; known: {ANSWERERS}")
    run = Path(run)
    config = load_train_config(run / "config.yaml")
    if not is_fact_task(config):
        raise ValueError(f"{run} trained on {config.dataset!r}, not the synthetic-facts task: no answers to check")
    fuser = load_fuser(run / "final")
    receiver, receiver_tok = load_model(fuser.config.receiver)
    sharer, sharer_tok = load_model(fuser.config.sharer)
    data = load_tokenized(config.dataset, receiver_tok, [sharer_tok], max_examples=config.max_examples,
                          max_length=config.max_length, progress=False)
    _, held_out = split_indices(len(data), config.eval_fraction, config.seed)
    batch = collate_examples([data[i] for i in held_out], receiver_tok.pad_token_id, [sharer_tok.pad_token_id])
    first_answer_token = batch.continuation_ids[:, 0]  # (B,)
    answers_by_first_token = {}
    for answer in batch.continuation_ids.tolist():
        if answers_by_first_token.setdefault(answer[0], answer) != answer:
            raise ValueError(f"{run}: two different answers start with token {answer[0]}; the first answer token "
                             "does not decide the fact")
    accuracy = {}
    with torch.no_grad():
        for answerer in answerers:
            if answerer == "sharer":
                if sharer_tok.get_vocab() != receiver_tok.get_vocab():
                    raise ValueError("the sharer alone is scored in the receiver's token ids: "
                                     "it needs the same vocabulary")
                prompt = batch.inputs  # same vocabulary: the sharer reads the receiver's prompt ids
                logits = sharer(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask,
                                position_ids=position_ids(prompt.attention_mask)).logits[:, -1]  # (B, V)
            else:
                used = fuser
                if answerer == "receiver":
                    used = copy.deepcopy(fuser)
                    used.gate_logit.fill_(-1.0)  # every gate closed
                model = C2CModel(receiver, receiver_tok, [sharer], [sharer_tok], [used])
                logits = model(batch.inputs)[:, 0]  # (B, V): the first answer token
            accuracy[answerer] = (logits.argmax(-1) == first_answer_token).float().mean().item()
    return accuracy


def run_knowledge_transfer(config: str | Path, out: str | Path, *, progress: bool = True) -> list[dict]:
    """Train the benchmark's two fusers under `out` and score the held-out facts (resumable: finished runs
    are reused). `out/expert`: the config as it is; `out/control`: the same run with the sharer before
    fine-tuning. Returns one row per setting: held-out loss per answer token where a fuser run measured it
    (the receiver alone is the expert run's step 0, gates closed) and first-answer-token accuracy."""
    out = Path(out)
    runs = {"expert": {}, "control": {"sharer_finetune": None}}
    evals = {}
    for name, overrides in runs.items():
        train(config, overrides={"output_dir": str(out / name), "progress": progress, **overrides})
        evals[name] = [entry["eval_loss"] for entry in read_log(out / name) if "eval_loss" in entry]
    expert = held_out_answer_accuracy(out / "expert", ("receiver", "sharer", "c2c"))
    control = held_out_answer_accuracy(out / "control", ("c2c",))
    return [
        {"setting": "receiver alone", "held_out_loss": evals["expert"][0], "answer_accuracy": expert["receiver"]},
        {"setting": "sharer alone (knows the facts)", "held_out_loss": None, "answer_accuracy": expert["sharer"]},
        {"setting": "C2C, sharer before fine-tuning (control)", "held_out_loss": evals["control"][-1],
         "answer_accuracy": control["c2c"]},
        {"setting": "C2C", "held_out_loss": evals["expert"][-1], "answer_accuracy": expert["c2c"]},
    ]
