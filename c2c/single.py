"""The Single baseline of the paper's Table 6: the receiver itself fine-tuned (all its parameters, no sharer) on
the data and budget of a fuser's training config.

    python -m c2c.single --config configs/train_small_mc.yaml [--key value ...]

It reads the fuser's config and changes only what is trained: the same examples (dataset, max_examples,
max_length, answer_prefix: the evaluation's prompt with the answer prefix in it; tokenized with the sharer too,
so exactly the examples the fuser trains on are kept), the same train/eval split, batch order (seed, length
bucketing), number of steps, AdamW settings, warm-up and linear decay and gradient clipping, and the loss on the
same scored tokens, here the receiver's own next-token cross-entropy over prompt + continuation. Weight decay
applies to every parameter (as the fuser's optimizer decays every fuser parameter by default).

Output: a model folder `single_output_dir(config)` (`<output_dir>_single`, beside the fuser's run) holding the
fine-tuned receiver (save_pretrained: safetensors, config, tokenizer) and `single_run.json` (trainable
parameters, steps, held-out loss before and after, seconds). An evaluation method reads it as its model:
`{name: receiver, key: single, model: runs/<profile>/<run>_single}`. A finished folder is reused by the same
config; a run stopped part-way resumes from its last checkpoint (`checkpoint/`: weights, optimizer, schedule,
step; every `checkpoint_every` steps). Where the config fine-tunes copies of the models first (receiver_finetune,
the knowledge-transfer task), Single starts from the same copy the fuser's receiver is. Frozen-model options of
the fuser's config (prefix_cache, model_dtype) do not apply: the receiver trains in fp32 (bf16 autocast where
the config's precision is bf16).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from c2c.data import IGNORE_INDEX, batch_order, load_tokenized, split_indices
from c2c.fused import pad_token_id
from c2c.models import load_model, resolve_model_source
from c2c.paths import cache_dir, repo_relative
from c2c.train import _model_sources, linear_schedule
from c2c.train_config import TrainConfig, load_train_config, parse_args

RUN_RECORD = "single_run.json"
CHECKPOINT = "checkpoint"  # inside the output folder while the run is not finished
STATE_NAME = "training_state.pt"


def single_output_dir(config: TrainConfig) -> Path:
    """Where the Single model of a fuser's training config goes: `<output_dir>_single`, beside the fuser's run."""
    out = Path(config.output_dir)
    return out.with_name(out.name + "_single")


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _run_fields(config: TrainConfig) -> dict:
    """The config keys that decide what Single computes (a finished or checkpointed run is reused only by these)."""
    keys = ("receiver", "sharer", "dataset", "max_examples", "max_length", "alignment", "answer_prefix",
            "answer_tokens", "eval_fraction", "eval_max_examples", "learning_rate", "weight_decay", "adam_beta1",
            "adam_beta2", "adam_epsilon", "warmup_ratio", "max_grad_norm", "epochs", "max_steps", "batch_size",
            "grad_accum", "length_bucketing", "seed", "precision")
    values = config.to_dict()
    return {k: values[k] for k in keys}


def _batch(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels), each (B, L): prompt + continuation, labels on the
    continuation only (transformers' convention: not shifted)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for b, e in enumerate(examples):
        ids[b, :len(e)] = torch.tensor(e.input_ids)
        mask[b, :len(e)] = 1
        labels[b, :len(e)] = torch.tensor(e.labels)
    return ids, mask, labels


def loss_sum(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of `model` over the labelled tokens; the output layer runs only where a
    label follows (not over the whole padded batch and vocabulary)."""
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, H)
    targets = labels[:, 1:].flatten()  # (B * (L-1),) the token after each position
    positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (M,)
    picked = hidden[:, :-1].flatten(0, 1).index_select(0, positions)  # (M, H)
    logits = model.get_output_embeddings()(picked).float()  # (M, V)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets.index_select(0, positions), reduction="sum")


def train_single(config: str | os.PathLike | dict | TrainConfig, *, overrides: dict | None = None,
                 output_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Fine-tune the config's receiver as Single (see the module's docstring); returns the model folder."""
    config = load_train_config(config, overrides)
    out = Path(output_dir) if output_dir is not None else single_output_dir(config)
    fields = _run_fields(config)
    if (out / RUN_RECORD).is_file():
        recorded = json.loads((out / RUN_RECORD).read_text())["config"]
        if recorded != fields:
            changed = sorted(k for k in fields if recorded.get(k) != fields[k])
            raise ValueError(f"{out} holds a Single model of another config (differing: {', '.join(changed)}); "
                             "delete it to retrain, or give another output folder")
        if progress:
            print(f"c2c.single: {repo_relative(out)} already holds the finished run")
        return out

    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint = out / CHECKPOINT
    state = torch.load(checkpoint / STATE_NAME, map_location="cpu", weights_only=False) \
        if (checkpoint / STATE_NAME).is_file() else None
    if state is not None and state["config"] != fields:
        raise ValueError(f"{checkpoint} belongs to a Single run of another config; delete {out} to retrain")
    # the fuser's receiver and sharer: the config's models, or the fine-tuned copies it asks for (built once)
    sources = _model_sources(config, PartialState())
    receiver, tokenizer = load_model(checkpoint if state else sources["receiver"], dtype=torch.float32, device=device)
    location, gguf = resolve_model_source(sources["sharer"])
    sharer_tokenizer = AutoTokenizer.from_pretrained(location, **({"gguf_file": gguf} if gguf else {}))
    data = load_tokenized(config.dataset, tokenizer, [sharer_tokenizer], max_examples=config.max_examples,
                          alignment=config.alignment, max_length=config.max_length,
                          cache_folder=cache_dir() / "datasets" if config.data_cache else None, progress=progress,
                          num_proc=config.num_proc, answer_prefix=config.answer_prefix)
    if config.answer_tokens is not None:
        data = data.first_answer_tokens(config.answer_tokens)
    train_index, eval_index = split_indices(len(data), config.eval_fraction, config.seed)
    if config.eval_max_examples is not None:
        eval_index = eval_index[:config.eval_max_examples]
    steps_per_epoch = len(train_index) // config.batch_size // config.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_index)} training examples are fewer than one optimizer step needs "
                         f"(batch_size {config.batch_size} x grad_accum {config.grad_accum})")
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    pad_id = pad_token_id(tokenizer)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=config.precision == "bf16")

    receiver.requires_grad_(True)
    optimizer = torch.optim.AdamW(receiver.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, warmup_steps))

    def held_out_loss() -> float | None:
        if len(eval_index) == 0:
            return None
        receiver.eval()
        total, tokens = 0.0, 0
        with torch.no_grad(), autocast:
            for start in range(0, len(eval_index), config.batch_size):
                ids, mask, labels = _batch([data[i] for i in eval_index[start:start + config.batch_size]], pad_id)
                total += float(loss_sum(receiver, ids.to(device), mask.to(device), labels.to(device)))
                tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
        receiver.train()
        return total / tokens

    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, seconds, before = state["step"], state["seconds"], state["eval_loss_before"]
        print(f"c2c.single: resumed from {repo_relative(checkpoint)} at step {step}")
    else:
        step, seconds, before = 0, 0.0, held_out_loss()
    lengths, scored = data.lengths, data.continuation_lengths  # (N,) each
    epoch_order = (-1, [])  # (epoch, its batches): computed once per epoch
    receiver.train()
    bar = tqdm(total=total_steps, initial=step, desc="fine-tuning the receiver (Single)", disable=not progress)
    while step < total_steps:
        start = time.perf_counter()
        epoch, within = divmod(step, steps_per_epoch)
        if epoch_order[0] != epoch:
            epoch_order = (epoch, batch_order(train_index, lengths, config.batch_size, seed=config.seed, epoch=epoch,
                                              length_bucketing=config.length_bucketing))
        batches = epoch_order[1][within * config.grad_accum:(within + 1) * config.grad_accum]
        step_tokens = int(sum(scored[b].sum() for b in batches))
        for indices in batches:
            ids, mask, labels = _batch([data[i] for i in indices], pad_id)
            with autocast:
                loss = loss_sum(receiver, ids.to(device), mask.to(device), labels.to(device))
            (loss / step_tokens).backward()
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(receiver.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds += time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()) / max(1, int(scored[batches[-1]].sum())):.4f}")
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
            _save(receiver, tokenizer, checkpoint, {"config": fields, "optimizer": optimizer.state_dict(),
                                                    "scheduler": scheduler.state_dict(), "step": step,
                                                    "seconds": seconds, "eval_loss_before": before})
    bar.close()
    record = {"config": fields, "trainable_parameters": trainable_parameters(receiver), "steps": total_steps,
              "train_examples": len(train_index), "eval_examples": len(eval_index), "eval_loss_before": before,
              "eval_loss_after": held_out_loss(), "seconds": round(seconds, 1), "device": device}
    receiver.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(checkpoint, ignore_errors=True)
    (out / RUN_RECORD).write_text(json.dumps(record, indent=2))  # last: its presence means finished
    if progress:
        print(f"c2c.single: done, {total_steps} steps; held-out loss {before} -> {record['eval_loss_after']}; "
              f"model in {repo_relative(out)}")
    return out


def _save(model, tokenizer, folder: Path, state: dict) -> None:
    """A checkpoint, written beside and then moved into place (a crash mid-write leaves the previous one)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / STATE_NAME)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)


def main(argv: list[str] | None = None) -> None:
    config_path, overrides = parse_args(argv)
    if config_path is None:
        raise SystemExit("usage: python -m c2c.single --config TRAIN_CONFIG.yaml [--key value ...]")
    train_single(config_path, overrides=overrides)


if __name__ == "__main__":
    main()
