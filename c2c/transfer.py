"""The controlled knowledge-transfer benchmark: facts only the sharer has learned.

`configs/train_tiny.yaml` builds it on the tiny pair: invented people and their favourite colours
(`c2c.data.synthetic_facts`, 8 colours, so chance is 1/8). The sharer is fine-tuned on all facts,
the receiver on the same kind of question about other people (it knows the answer format, not
these facts); the fuser trains on 90% of the facts. Success = on the held-out facts, the receiver
with C2C answers what it cannot answer alone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from c2c.data import collate_examples, load_tokenized, split_indices
from c2c.fused import C2CModel
from c2c.fuser import C2CFuser
from c2c.models import load_model
from c2c.train import load_config


def held_out_answer_accuracy(run: str | Path, *, closed: bool = False) -> float:
    """Share of a training run's held-out questions whose first answer token is the receiver's top
    prediction after the fused prefix; `closed=True` closes every gate (the receiver alone).

    The facts' answers have distinct first tokens in the tiny tokenizers, so the first answer token
    decides the fact.
    """
    run = Path(run)
    config = load_config(run / "config.yaml")
    fuser = C2CFuser.from_pretrained(run / "final")
    if closed:
        with torch.no_grad():
            fuser.gate_logit.fill_(-1.0)
    receiver, receiver_tok = load_model(fuser.config.receiver)
    sharer, sharer_tok = load_model(fuser.config.sharer)
    model = C2CModel(receiver, receiver_tok, [sharer], [sharer_tok], [fuser])
    data = load_tokenized(config.dataset, receiver_tok, [sharer_tok], max_examples=config.max_examples,
                          max_length=config.max_length, progress=False)
    _, held_out = split_indices(len(data), config.eval_fraction, config.seed)
    batch = collate_examples([data[i] for i in held_out], receiver_tok.pad_token_id, [sharer_tok.pad_token_id])
    with torch.no_grad():
        logits = model(batch.inputs)  # (B, 1, V): the first answer token
    return (logits[:, 0].argmax(-1) == batch.continuation_ids[:, 0]).float().mean().item()
