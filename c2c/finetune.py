"""Fine-tune a copy of a model on chats, for the synthetic knowledge-transfer task.

A training config's `receiver_finetune:` / `sharer_finetune:` (c2c.train_config.FINETUNE_OPTIONS) asks for
one: e.g. a sharer that knows invented facts (`synthetic:facts`) and a receiver that knows only the question
format. `finetuned_model_path` builds the copy once under cache_dir()/finetuned, keyed by every input, and
returns its folder, which `c2c.models.load_model` takes like any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from c2c.data import IGNORE_INDEX, continuation_text, load_conversations, remove_system_turns, source_fingerprint
from c2c.fused import pad_token_id
from c2c.models import resolve_model_source
from c2c.paths import cache_dir

# The defaults suit the tiny random-weight models; pretrained ones need a far smaller learning rate
# (configs/train_transfer_small.yaml: 1e-4 to 3e-4)
FINETUNE_DEFAULTS = {"steps": 300, "batch_size": 32, "learning_rate": 3e-3, "seed": 0}


def _chat_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]] | None:
    messages = remove_system_turns(messages)
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        return None
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True,
                                           enable_thinking=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(continuation_text(tokenizer, messages), add_special_tokens=False)
    return prompt_ids, answer_ids


def finetune_on_chats(source: str, conversations: list[list[dict]], folder: str | os.PathLike, *,
                      steps: int = FINETUNE_DEFAULTS["steps"], batch_size: int = FINETUNE_DEFAULTS["batch_size"],
                      learning_rate: float = FINETUNE_DEFAULTS["learning_rate"], seed: int = FINETUNE_DEFAULTS["seed"],
                      progress: bool = False) -> Path:
    """Full fine-tune of a copy of a causal LM on chats (loss on the last assistant turn), saved to `folder`.

    A small helper for the synthetic knowledge-transfer task (make a sharer that knows facts); fp32,
    AdamW with a constant learning rate, seeded batches.
    """
    location, gguf = resolve_model_source(source)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)
    model.requires_grad_(True).train()
    rows = [r for r in (_chat_tokens(tokenizer, m) for m in conversations) if r is not None]
    if not rows:
        raise ValueError("finetune_on_chats: no usable conversation (each needs a final assistant turn)")
    pad = pad_token_id(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for _ in tqdm(range(steps), desc="fine-tuning", disable=not progress):
        if len(order) < batch_size:
            order += rng.permutation(len(rows)).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        width = max(len(rows[i][0]) + len(rows[i][1]) for i in chosen)
        ids = torch.full((len(chosen), width), pad)
        labels = torch.full((len(chosen), width), IGNORE_INDEX)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for b, i in enumerate(chosen):
            prompt, answer = rows[i]
            n = len(prompt) + len(answer)
            ids[b, :n] = torch.tensor(prompt + answer)
            labels[b, len(prompt):n] = torch.tensor(answer)
            mask[b, :n] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    folder = Path(folder)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def finetuned_model_path(source: str, dataset: str, max_examples: int | None = None, *, progress: bool = False,
                         **options) -> Path:
    """`finetune_on_chats(source, <dataset>)`, built once under cache_dir()/finetuned (keyed by all inputs but
    `progress`)."""
    options = {**FINETUNE_DEFAULTS, **options}
    location, _ = resolve_model_source(source)
    fields = {"source": source_fingerprint(location), "dataset": source_fingerprint(dataset),
              "max_examples": max_examples, **options}
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir() / "finetuned" / f"{Path(str(source)).name}-{key}"
    if not (folder / "config.json").exists():
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        finetune_on_chats(source, load_conversations(dataset, max_examples), tmp, progress=progress, **options)
        if folder.exists():
            shutil.rmtree(tmp)
        else:
            tmp.replace(folder)
    return folder
