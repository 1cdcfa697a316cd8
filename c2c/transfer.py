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

from pathlib import Path

import torch

from c2c.data import collate_examples, load_tokenized, split_indices
from c2c.fused import C2CModel, position_ids
from c2c.fuser import C2CFuser
from c2c.models import load_model
from c2c.train import TrainConfig, load_config, read_log, train

ANSWERERS = ("receiver", "sharer", "c2c")


def is_fact_task(config: TrainConfig) -> bool:
    """Whether a training config is the synthetic-facts task (answers checkable by their first token)."""
    return config.dataset.startswith("synthetic:facts")


def held_out_answer_accuracy(run: str | Path, answerer: str = "c2c") -> float:
    """Share of a training run's held-out questions whose first answer token is the top prediction of
    `answerer`: "c2c" (the receiver after the fused prefix), "receiver" (alone: every gate closed) or
    "sharer" (alone, on its own prompt; needs the receiver's vocabulary).

    The facts' answers have distinct first tokens (checked), so the first answer token decides the fact.
    """
    if answerer not in ANSWERERS:
        raise ValueError(f"unknown answerer {answerer!r}; one of {ANSWERERS}")
    run = Path(run)
    config = load_config(run / "config.yaml")
    if not is_fact_task(config):
        raise ValueError(f"{run} trained on {config.dataset!r}, not the synthetic-facts task: no answers to check")
    fuser = C2CFuser.from_pretrained(run / "final")
    if answerer == "receiver":
        with torch.no_grad():
            fuser.gate_logit.fill_(-1.0)
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
    with torch.no_grad():
        if answerer == "sharer":
            if sharer_tok.get_vocab() != receiver_tok.get_vocab():
                raise ValueError("the sharer alone is scored in the receiver's token ids: it needs the same vocabulary")
            prompt = batch.inputs.sharers[0]
            logits = sharer(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask,
                            position_ids=position_ids(prompt.attention_mask)).logits[:, -1]  # (B, V)
        else:
            model = C2CModel(receiver, receiver_tok, [sharer], [sharer_tok], [fuser])
            logits = model(batch.inputs)[:, 0]  # (B, V): the first answer token
    return (logits.argmax(-1) == first_answer_token).float().mean().item()


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
    return [
        {"setting": "receiver alone", "held_out_loss": evals["expert"][0],
         "answer_accuracy": held_out_answer_accuracy(out / "expert", "receiver")},
        {"setting": "sharer alone (knows the facts)", "held_out_loss": None,
         "answer_accuracy": held_out_answer_accuracy(out / "expert", "sharer")},
        {"setting": "C2C, sharer before fine-tuning (control)", "held_out_loss": evals["control"][-1],
         "answer_accuracy": held_out_answer_accuracy(out / "control", "c2c")},
        {"setting": "C2C", "held_out_loss": evals["expert"][-1],
         "answer_accuracy": held_out_answer_accuracy(out / "expert", "c2c")},
    ]
