"""Train C2C fusers: the paper's recipe, resumable, on one device or many (accelerate).

    python -m c2c.train --config configs/train_tiny.yaml [--key value ...] [--fuser.hidden_dim 64]
    accelerate launch -m c2c.train --config configs/train_paper.yaml

or, from Python, `train("configs/train_tiny.yaml")` / `train({...})`, which returns the folder of the
final fuser (`c2c.checkpoint.load_fuser(folder)` loads it).

What happens (spec, "Training recipe"): only the fusers train; receiver and sharer are frozen in eval
mode. Each example is a chat instruction (fused prefill) and the last assistant turn (scored by
next-token cross-entropy on the receiver, see `continuation_loss`). AdamW, linear schedule with
warm-up, gradient clipping, gradient accumulation, bf16 autocast with fp32 master weights (or pure
bf16), gate temperature annealed after every optimizer step. The gate logits are under weight decay
like every other weight, as in the paper's reference (it pulls them towards 0 = closed at inference);
a config that wants them exempt says so: `fuser.exempt_gates_from_weight_decay: true`.

The loss of one optimizer step is the mean over *all* scored tokens of that step (every micro-batch
and every process), so gradient accumulation and the number of GPUs do not change its value.

Run folder (`output_dir`):
    config.yaml              the resolved config; a folder holding another run is refused
    data_stats.json          examples kept / dropped (by reason), train/eval sizes
    log.jsonl                one line per logged step: step, epoch, lr, temperature, gate_logits
                             ([K, V] per receiver layer), train_loss and/or eval_loss, tokens/s,
                             elapsed_s (wall-clock seconds of the training loop so far: evaluation and
                             checkpoints included, loading models/data/prompt caches not; a resumed run
                             continues from its checkpoint's count)
    checkpoint-000500/       the fuser (c2c.checkpoint.save_fuser) + training_state.pt (optimizer, scheduler,
                             step, data position, loss window) + rng_state_<rank>.pt
    final/                   the final fuser (c2c.checkpoint.save_fuser)
A run whose folder holds checkpoints resumes from the latest one (`resume: true`), exactly: the
data order is a function of (seed, epoch) and every RNG state is restored, so on CPU a resumed
run ends with bit-identical weights to an uninterrupted one. A latest checkpoint that is incomplete
or damaged is skipped with a warning (the one before it is used); a torn last line of log.jsonl (a
crash mid-write) is dropped with a warning.

Nothing stale: a run's checkpoints and its finished fuser are reused only by the same config and the
same training code (`code_version` of `TRAIN_CODE`, recorded in each checkpoint and in
`final/training_run.json`); otherwise the run refuses and says what to delete. The output folder is
locked while a run writes it (`c2c.locks`: a second run on it refuses, naming the first's pid).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from c2c.align import LAYER_MAP_STRATEGIES, layer_map
from c2c.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_fuser_config, save_fuser
from c2c.data import (
    DROP_REASONS,
    TrainBatch,
    batch_order,
    collate_examples,
    continuation_text,
    load_conversations,
    load_tokenized,
    remove_system_turns,
    split_indices,
)
from c2c.fused import C2CModel, sharer_prefix_length
from c2c.fingerprint import code_version
from c2c.fuser import C2CFuser, FuserConfig
from c2c.jsonl import read_jsonl
from c2c.locks import LOCK_NAME, folder_lock
from c2c.paths import cache_dir

logger = logging.getLogger(__name__)
# the code that determines what a run computes; a change makes its checkpoints and final fuser stale
TRAIN_CODE = ("c2c.train", "c2c.fuser", "c2c.fused", "c2c.data", "c2c.align", "c2c.models")
RUN_RECORD = "training_run.json"  # in final/: the training code version that produced it
from c2c.prefixes import PrefixStore

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

# FuserConfig options a config may set under `fuser:` (shapes come from the models)
FUSER_OPTIONS: dict[str, type] = {
    "hidden_dim": int, "intermediate_dim": int, "num_layers": int, "dropout": float, "gate_noise": str,
    "initial_temperature": float, "final_temperature": float, "anneal_steps": int,  # or "total"
    "exempt_gates_from_weight_decay": bool, "variant": str,
}
# options of `receiver_finetune:` / `sharer_finetune:` (a demo/test aid: fine-tune a copy of the model first,
# cached; dataset and max_examples default to the run's). The defaults suit the tiny random-weight models;
# pretrained ones need a far smaller learning rate (configs/train_transfer_small.yaml: 1e-4 to 3e-4)
FINETUNE_OPTIONS: dict[str, type] = {
    "dataset": str, "max_examples": int, "steps": int, "batch_size": int, "learning_rate": float, "seed": int,
}
FINETUNE_DEFAULTS = {"steps": 300, "batch_size": 32, "learning_rate": 3e-3, "seed": 0}
PRECISIONS = ("auto", "bf16", "fp32")
MODEL_DTYPES = ("auto", "bfloat16", "float32")
SECTIONS = ("fuser", "receiver_finetune", "sharer_finetune")


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run. Defaults are the paper's recipe where it has one."""

    # models (anything `c2c.models.load_model` takes)
    receiver: str = "tiny-receiver"
    sharer: str = "tiny-sharer"
    # demos/tests: fine-tune a copy of a model first (cached), e.g. {dataset: "synthetic:facts"}; see FINETUNE_OPTIONS
    receiver_finetune: dict | None = None
    sharer_finetune: dict | None = None
    layer_map: str = "terminal"
    alignment: str = "longest"  # token alignment for sharers with another tokenizer
    # data
    dataset: str = "teknium/OpenHermes-2.5"
    max_examples: int | None = None  # the first N conversations of the source
    max_length: int = 2048  # drop examples over this many receiver tokens (instruction + answer)
    eval_fraction: float = 0.01
    length_bucketing: bool = False
    num_proc: int = 1  # processes for the one-off tokenization
    data_cache: bool = True  # keep tokenized data under cache_dir()/datasets
    # the last assistant turn starts with this text, which is then part of the fused prompt (c2c.data.build_example):
    # "The correct answer is" trains multiple-choice answers in the evaluation's letter-scoring form
    answer_prefix: str | None = None
    # keep the frozen models' prompt caches on disk (c2c.prefixes): computed once before the first step,
    # then every step (and every later run on the same data and models) reads them
    prefix_cache: bool = False
    model_dtype: str = "auto"  # frozen receiver/sharer: auto (bfloat16 under bf16 precision, else float32) | bfloat16 | float32
    # fuser (FuserConfig options; anneal_steps: "total" = the run's optimizer steps; the gate logits are
    # decayed, as in the paper's reference, unless exempt_gates_from_weight_decay: true)
    fuser: dict = dataclasses.field(default_factory=dict)
    # optimisation
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 4  # sequences per device per micro-batch
    grad_accum: int = 1
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    fp32_master_weights: bool = True  # bf16: keep fuser weights/optimizer in fp32 (autocast) or train pure bf16
    seed: int = 42
    # bookkeeping
    eval_every: int = 100  # optimizer steps; 0 = only at the end. Step 0 is evaluated too (closed gates)
    eval_max_examples: int | None = None
    eval_batch_size: int | None = None  # default: batch_size
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int | None = None  # keep only the newest N checkpoints
    output_dir: str = "runs/c2c"
    resume: bool = True  # continue from the latest checkpoint in output_dir
    resume_from: str | None = None  # or from this checkpoint folder (of the same run)
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# keys that do not change what a run computes: they may differ when resuming
NON_RUN_KEYS = {"output_dir", "resume", "resume_from", "progress", "checkpoint_every", "keep_checkpoints",
                "num_proc", "data_cache"}
_TYPES = typing.get_type_hints(TrainConfig)


def _coerce(name: str, value, kind):
    """Value -> the field's type (YAML/CLI give strings for e.g. 1e-4), or a ValueError naming the key."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        kind = next(a for a in args if a is not type(None))
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if kind is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if kind is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        pass
    raise ValueError(f"config key {name!r}: cannot use {value!r} as {getattr(kind, '__name__', kind)}")


def _check_section(section: str, values: dict, options: dict[str, type]) -> dict:
    unknown = sorted(set(values) - set(options))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} under {section!r}; valid keys: {sorted(options)}")
    out = {}
    for key, value in values.items():
        if section == "fuser" and key == "anneal_steps" and value == "total":
            out[key] = value
        else:
            out[key] = _coerce(f"{section}.{key}", value, options[key])
    return out


def _set_dotted(config: dict, key: str, value) -> None:
    head, _, rest = key.partition(".")
    if rest:
        if head not in SECTIONS:
            raise ValueError(f"unknown config key {key!r}: only {sorted(SECTIONS)} take sub-keys "
                             "(as in 'fuser.hidden_dim')")
        section = config.get(head) or {}
        config[head] = {**section, rest: value}
    else:
        config[key] = value


def load_config(source: "str | os.PathLike | dict | TrainConfig", overrides: dict | None = None) -> TrainConfig:
    """A validated TrainConfig from a YAML file, a dict or a TrainConfig, with `overrides` ("a.b" keys) applied.

    Unknown keys raise a ValueError naming them and listing the valid keys.
    """
    if isinstance(source, TrainConfig):
        raw = source.to_dict()
    elif isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path} must hold a mapping of keys to values")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    valid = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid keys: {valid}")
    values = {key: _coerce(key, value, _TYPES[key]) for key, value in raw.items()}
    values["fuser"] = _check_section("fuser", values.get("fuser") or {}, FUSER_OPTIONS)
    for section in ("receiver_finetune", "sharer_finetune"):
        if values.get(section) is not None:
            values[section] = _check_section(section, values[section], FINETUNE_OPTIONS)
    config = TrainConfig(**values)
    _validate(config)
    return config


def _validate(c: TrainConfig) -> None:
    problems = []
    if c.precision not in PRECISIONS:
        problems.append(f"precision must be one of {PRECISIONS}, got {c.precision!r}")
    if c.model_dtype not in MODEL_DTYPES:
        problems.append(f"model_dtype must be one of {MODEL_DTYPES}, got {c.model_dtype!r}")
    if c.layer_map not in LAYER_MAP_STRATEGIES:
        problems.append(f"layer_map must be one of {LAYER_MAP_STRATEGIES}, got {c.layer_map!r}")
    for key in ("batch_size", "grad_accum", "epochs", "max_length", "log_every", "num_proc"):
        if getattr(c, key) < 1:
            problems.append(f"{key} must be >= 1, got {getattr(c, key)}")
    for key in ("max_steps", "max_examples", "eval_max_examples", "eval_batch_size", "keep_checkpoints"):
        if getattr(c, key) is not None and getattr(c, key) < 1:
            problems.append(f"{key} must be >= 1 or null, got {getattr(c, key)}")
    for key in ("eval_every", "checkpoint_every"):
        if getattr(c, key) < 0:
            problems.append(f"{key} must be >= 0, got {getattr(c, key)}")
    if not 0 <= c.warmup_ratio <= 1:
        problems.append(f"warmup_ratio must be in [0, 1], got {c.warmup_ratio}")
    if not 0 <= c.eval_fraction < 1:
        problems.append(f"eval_fraction must be in [0, 1), got {c.eval_fraction}")
    anneal = c.fuser.get("anneal_steps", "total")
    if anneal != "total" and (not isinstance(anneal, int) or anneal < 1):
        problems.append(f"fuser.anneal_steps must be 'total' or a positive int, got {anneal!r}")
    if problems:
        raise ValueError("invalid training config: " + "; ".join(problems))


def run_fields(config: TrainConfig | dict) -> dict:
    """The config entries that define what a run computes (all but `NON_RUN_KEYS`)."""
    values = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
    return {k: v for k, v in values.items() if k not in NON_RUN_KEYS}


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def parse_args(argv: list[str] | None = None) -> tuple[str | None, dict]:
    """`--config PATH` and `--key value` / `--key=value` overrides (values read as YAML scalars)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, overrides = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; use --config PATH and --key value overrides")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"missing value for --{key}")
            value = argv[i + 1]
            i += 1
        i += 1
        key = key.replace("-", "_") if "." not in key else key
        if key == "config":
            config_path = value
        else:
            overrides[key] = yaml.safe_load(value) if value != "" else ""
    return config_path, overrides


def attach_prefix_stores(receiver, sharers, data, *, progress: bool = True) -> list:
    """Fill and attach a `c2c.prefixes.PrefixStore` for the receiver and each sharer: the caches of every
    example's prompt (the receiver's ids but the last, each sharer's ids that fusion reads)."""
    examples = [data[i] for i in range(len(data))]
    stores = [PrefixStore(receiver, progress=progress)]
    stores[0].fill([e.prompt_ids[:-1] for e in examples], desc="receiver prompt caches")
    for j, sharer in enumerate(sharers):
        stores.append(PrefixStore(sharer, progress=progress))
        stores[-1].fill([e.prompt[j].sharer_ids[:sharer_prefix_length(e.prompt[j])] for e in examples],
                        desc=f"sharer {j} prompt caches")
    for store in stores:
        store.attach()
    return stores


# ---------------------------------------------------------------------------------------------
# Loss, optimiser, schedule
# ---------------------------------------------------------------------------------------------


def continuation_loss(model: C2CModel, batch: TrainBatch) -> torch.Tensor:
    """Sum of next-token cross-entropies of the receiver over the batch's scored continuation tokens.

    Same computation as `model(inputs, continuation_ids[:, :-1])` followed by cross-entropy on its
    logits, but the output layer runs only on the positions that have a label (no padding, no logit
    after the last token). The receiver's decoder runs with autograd on (through the fused cache into
    the fusers); its own weights are frozen, so they get no gradients.
    """
    ids, mask, positions = model.continuation_inputs(batch.inputs, batch.continuation_ids[:, :-1],
                                                     batch.continuation_mask[:, :-1])  # (B, R)
    hidden = model.receiver.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions,
                                          cache=model.prefill(batch.inputs),
                                          use_cache=True).last_hidden_state  # (B, R, H)
    picked = hidden.flatten(0, 1).index_select(0, batch.label_positions)  # (M, H)
    logits = model.receiver.get_output_embeddings()(picked).float()  # (M, V)
    softcap = getattr(model.receiver.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    targets = batch.labels.flatten().index_select(0, batch.label_positions)  # (M,)
    return F.cross_entropy(logits, targets, reduction="sum")


class FuserTrainingModule(nn.Module):
    """What the optimizer (and DDP) sees: only the fusers are registered; the frozen receiver and sharers
    are held by reference, so they are neither broadcast nor bucketed nor saved with the trainable state."""

    def __init__(self, model: C2CModel):
        super().__init__()
        self.fusers = model.fusers
        self.__dict__["model"] = model  # not a submodule

    def forward(self, batch: TrainBatch) -> torch.Tensor:
        return continuation_loss(self.model, batch)


def optimizer_groups(fuser: C2CFuser, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on everything but `fuser.no_weight_decay_parameter_names()`."""
    exempt = fuser.no_weight_decay_parameter_names()
    decay, no_decay = [], []
    for name, parameter in fuser.named_parameters():
        if parameter.requires_grad:
            (no_decay if name in exempt else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def linear_schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier after `step` scheduler steps: linear warm-up from 0, then linear decay to 0 at total_steps
    (the usual `get_linear_schedule_with_warmup` shape)."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return multiplier


# ---------------------------------------------------------------------------------------------
# Fine-tuning a copy of a model on chats (for the synthetic knowledge-transfer task)
# ---------------------------------------------------------------------------------------------


def _chat_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]] | None:
    messages = remove_system_turns(messages)
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        return None
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True,
                                           enable_thinking=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(continuation_text(tokenizer, messages), add_special_tokens=False)
    return prompt_ids, answer_ids


def finetune_on_chats(source: str, conversations: list[list[dict]], folder: str | os.PathLike, *, steps: int = 300,
                      batch_size: int = 32, learning_rate: float = 3e-3, seed: int = 0, progress: bool = False) -> Path:
    """Full fine-tune of a copy of a causal LM on chats (loss on the last assistant turn), saved to `folder`.

    A small helper for the synthetic knowledge-transfer task (make a sharer that knows facts); fp32,
    AdamW with a constant learning rate, seeded batches.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from c2c.models import resolve_model_source

    location, gguf = resolve_model_source(source)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)
    model.requires_grad_(True).train()
    rows = [r for r in (_chat_tokens(tokenizer, m) for m in conversations) if r is not None]
    if not rows:
        raise ValueError("finetune_on_chats: no usable conversation (each needs a final assistant turn)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for _ in tqdm(range(steps), desc="fine-tuning", disable=not progress):
        if len(order) < batch_size:
            order += rng.permutation(len(rows)).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        width = max(len(rows[i][0]) + len(rows[i][1]) for i in chosen)
        ids = torch.full((len(chosen), width), pad)
        labels = torch.full((len(chosen), width), -100)
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
    from c2c.data import source_fingerprint
    from c2c.models import resolve_model_source

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


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "training_state.pt"


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders of a run folder, oldest first (complete or not: see `checkpoint_problem`)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def checkpoint_problem(folder: Path, processes: int) -> str | None:
    """Why a run cannot resume from this checkpoint (a missing file, an unreadable weights file or fuser
    config), or None if it can."""
    from safetensors import SafetensorError, safe_open

    for name in (CONFIG_NAME, WEIGHTS_NAME, STATE_NAME, *(f"rng_state_{r}.pt" for r in range(processes))):
        if not (folder / name).is_file():
            return f"{name} is missing"
    try:
        with safe_open(str(folder / WEIGHTS_NAME), "pt"):
            pass
    except SafetensorError as error:
        return f"{WEIGHTS_NAME} is damaged ({error})"
    try:
        read_fuser_config(folder / CONFIG_NAME)
    except ValueError as error:
        return str(error)
    return None


def _latest_good_checkpoint(out: Path, processes: int) -> Path | None:
    """The newest checkpoint a run can resume from; newer broken ones are skipped with a warning."""
    found = checkpoints(out)
    for folder in reversed(found):
        problem = checkpoint_problem(folder, processes)
        if problem is None:
            return folder
        logger.warning("cannot resume from %s (%s); falling back to the checkpoint before it", folder, problem)
    if found:
        logger.warning("no usable checkpoint in %s: training starts again from step 0", out)
    return None


def _check_finished_run(final: Path, version: str) -> None:
    """A finished run is reused only if the same training code produced it."""
    try:
        recorded = json.loads((final / RUN_RECORD).read_text()).get("code_version")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != version:
        how = ("without a record of its training code (by an older version)" if recorded is None else
               f"by other training code (code version {recorded}, now {version}: {', '.join(TRAIN_CODE)})")
        raise ValueError(f"{final.parent} holds a run finished {how}, so its fuser may not be what this code "
                         f"trains. Delete {final.parent} to retrain it, or use another output_dir.")


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int, rank: int) -> None:
    value = int(np.random.SeedSequence([seed, rank, 7]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def _check_checkpoint_pair(folder: Path, receiver, sharer, config: TrainConfig) -> None:
    """The checkpoint's fuser must be for this receiver/sharer pair."""
    path = folder / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a training checkpoint (no {CONFIG_NAME})")
    recorded = read_fuser_config(path)
    try:
        recorded.check_fits(receiver.config, sharer.config)
    except ValueError as error:
        raise ValueError(f"cannot resume from {folder}: it was trained for receiver {recorded.receiver!r} <- "
                         f"sharer {recorded.sharer!r}, this run is receiver {config.receiver!r} <- sharer "
                         f"{config.sharer!r} ({error})") from None


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _accelerator(mixed_precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    handlers = []  # DDP defaults: the trainable module holds only the fusers, whose one buffer (tau) is tiny
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # several processes without CUDA (e.g. torchrun on CPU): accelerate's multi-CPU mode (gloo)
    cpu = world > 1 and not torch.cuda.is_available()
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=handlers)
    except ValueError as error:  # a notebook that trained before with another precision (single process only)
        if "already been initialized" not in str(error) or world > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=handlers)


def _prepare_run_folder(out: Path, config: TrainConfig) -> None:
    """Refuse a folder holding another run (or unrelated files); write config.yaml."""
    config_path = out / "config.yaml"
    if config_path.exists():
        previous = yaml.safe_load(config_path.read_text()) or {}
        diff = _differences(run_fields(previous), run_fields(config))
        if diff:
            raise ValueError(f"output folder {out} holds a different training run; differing config keys: "
                             f"{'; '.join(diff)}. Use another output_dir, or delete {out}.")
        if not config.resume and (checkpoints(out) or (out / "final").exists()):
            raise ValueError(f"output folder {out} already holds checkpoints of this run and resume is false; "
                             "set resume: true to continue it, or use another output_dir")
    elif out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise ValueError(f"output folder {out} is not empty and holds no training run (no config.yaml); "
                         "use an empty or new output_dir")
    out.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def read_log(run: str | os.PathLike) -> list[dict]:
    """The records of a run's log.jsonl (evaluations are those with "eval_loss"; step 0 = gates closed).
    A torn last line (a run killed mid-write) is left out with a warning."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run} holds no training run (yet)")
    return read_jsonl(path, fix=f"delete {path} (it is rewritten from the last checkpoint on resume)")


class _Log:
    """log.jsonl of the run (main process only); on resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [record for record in read_jsonl(path, fix=f"delete {path} to resume without the old log")
                    if record["step"] <= resume_step]
            path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


def train(config: "str | os.PathLike | dict | TrainConfig", *, overrides: dict | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> Path:
    """Train a fuser as `config` says (see `TrainConfig`); returns the final fuser's folder.

    on_step(step, info) is called after every optimizer step (after logging, evaluation and
    checkpointing of that step); info has "lr" (used by this step), "temperature" (after it), "epoch",
    "fuser", "model" (the C2CModel) and "optimizer".
    """
    config = load_config(config, overrides)
    main_process = int(os.environ.get("RANK", "0")) == 0  # accelerate / torchrun set RANK; one process: 0
    with folder_lock(config.output_dir, "training run") if main_process else contextlib.nullcontext():
        return _train(config, on_step)


def _train(config: TrainConfig, on_step: Callable[[int, dict], None] | None) -> Path:
    """`train` once the config is checked and (main process) the output folder is locked."""
    version = code_version(*TRAIN_CODE)
    if config.precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    else:
        precision = config.precision
    accelerator = _accelerator("bf16" if precision == "bf16" else "no")
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    out = Path(config.output_dir)
    if main:
        _prepare_run_folder(out, config)
    accelerator.wait_for_everyone()
    final = out / "final"
    if (final / "fuser_config.json").exists() and config.resume_from is None:
        _check_finished_run(final, version)
        if main:
            print(f"c2c.train: {out} already holds the finished run; final fuser in {final}")
        return final

    # ---- models --------------------------------------------------------------------------------
    from c2c.models import load_model

    if config.model_dtype == "auto":
        model_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    else:
        model_dtype = getattr(torch, config.model_dtype)
    sources = {}
    for role in ("receiver", "sharer"):
        sources[role] = getattr(config, role)
        finetune = getattr(config, f"{role}_finetune")
        if finetune is not None:
            options = dict(finetune)
            dataset = options.pop("dataset", config.dataset)
            max_examples = options.pop("max_examples", config.max_examples)
            with accelerator.main_process_first():
                sources[role] = str(finetuned_model_path(sources[role], dataset, max_examples,
                                                         progress=config.progress and main, **options))
    receiver_source, sharer_source = sources["receiver"], sources["sharer"]
    receiver, receiver_tokenizer = load_model(receiver_source, dtype=model_dtype)
    sharer, sharer_tokenizer = load_model(sharer_source, dtype=model_dtype)

    # ---- data ----------------------------------------------------------------------------------
    with accelerator.main_process_first():
        data = load_tokenized(config.dataset, receiver_tokenizer, [sharer_tokenizer], max_examples=config.max_examples,
                              alignment=config.alignment, max_length=config.max_length,
                              cache_folder=cache_dir() / "datasets" if config.data_cache else None,
                              progress=config.progress and main, num_proc=config.num_proc,
                              answer_prefix=config.answer_prefix)
    stores = []
    if config.prefix_cache:
        with accelerator.main_process_first():
            stores = attach_prefix_stores(receiver, [sharer], data, progress=config.progress and main)
    train_index, eval_index = split_indices(len(data), config.eval_fraction, config.seed)
    if config.eval_max_examples is not None:
        eval_index = eval_index[:config.eval_max_examples]
    global_batch = config.batch_size * world
    steps_per_epoch = len(train_index) // global_batch // config.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_index)} training examples are fewer than one optimizer step needs "
                         f"(batch_size {config.batch_size} x grad_accum {config.grad_accum} x {world} processes)")
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    if main:
        stats = {**data.stats, "train_examples": len(train_index), "eval_examples": len(eval_index),
                 "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "warmup_steps": warmup_steps,
                 "sequences_per_step": global_batch * config.grad_accum, "processes": world,
                 "drop_reasons": DROP_REASONS, "data_fingerprint": data.fingerprint(),
                 "prefix_stores": [store.describe() for store in stores]}
        (out / "data_stats.json").write_text(json.dumps(stats, indent=2))

    # ---- fuser, optimiser ----------------------------------------------------------------------
    fuser_options = dict(config.fuser)
    if fuser_options.get("anneal_steps", "total") == "total":
        fuser_options["anneal_steps"] = total_steps
    mapping = layer_map(receiver.config.num_hidden_layers, sharer.config.num_hidden_layers, config.layer_map)
    from c2c.align import TokenAligner

    shared = TokenAligner(receiver_tokenizer, sharer_tokenizer).shared_vocabulary
    fuser_config = FuserConfig.for_models(receiver.config, sharer.config, mapping, receiver=receiver_source,
                                          sharer=sharer_source, alignment=None if shared else config.alignment,
                                          **fuser_options)
    torch.manual_seed(config.seed)
    fuser = C2CFuser(fuser_config)
    if precision == "bf16" and not config.fp32_master_weights:
        fuser.to(torch.bfloat16)
    model = C2CModel(receiver, receiver_tokenizer, [sharer], [sharer_tokenizer], [fuser], alignment=config.alignment)
    optimizer = torch.optim.AdamW(optimizer_groups(fuser, config.weight_decay), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, warmup_steps))
    module = FuserTrainingModule(model)
    module, optimizer = accelerator.prepare(module, optimizer)
    device = accelerator.device
    receiver.to(device)
    sharer.to(device)

    # ---- resume --------------------------------------------------------------------------------
    if config.resume_from:
        resume_from = Path(config.resume_from)
        problem = checkpoint_problem(resume_from, world)
        if problem:
            raise ValueError(f"cannot resume from {resume_from}: {problem}; choose another checkpoint in "
                             "resume_from, or set it to null to resume from the latest good one")
    elif config.resume:
        resume_from = _latest_good_checkpoint(out, world)
    else:
        resume_from = None
    step, window_loss, window_tokens, elapsed_before = 0, torch.zeros((), device=device), 0, 0.0
    if resume_from is not None:
        _check_checkpoint_pair(resume_from, receiver, sharer, config)
        try:
            state = torch.load(resume_from / STATE_NAME, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
            raise ValueError(f"{resume_from / STATE_NAME} is damaged ({error}); delete {resume_from} to resume from "
                             "the checkpoint before it") from None
        diff = _differences(state["config"], run_fields(config))
        if diff:
            raise ValueError(f"cannot resume from {resume_from}: it belongs to a run with another config "
                             f"({'; '.join(diff)})")
        if state.get("code_version") != version:
            raise ValueError(f"cannot resume from {resume_from}: it was written by other training code (code "
                             f"version {state.get('code_version')}, now {version}: {', '.join(TRAIN_CODE)}); one "
                             f"run's steps come from one version of the code. Delete {out} to retrain, or use "
                             "another output_dir.")
        if state["processes"] != world:
            raise ValueError(f"cannot resume exactly from {resume_from}: it was saved by {state['processes']} "
                             f"processes, this run has {world} (the data order depends on the global batch)")
        if state["data_fingerprint"] != data.fingerprint():
            raise ValueError(f"cannot resume from {resume_from}: the tokenized dataset differs from the one it was "
                             "trained on")
        from safetensors.torch import load_file

        fuser.load_state_dict({k: v.to(device) for k, v in load_file(resume_from / "model.safetensors").items()})
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, window_tokens = state["step"], state["window_tokens"]
        elapsed_before = state["elapsed_s"]  # written by this code version (checked above)
        local = torch.load(resume_from / f"rng_state_{rank}.pt", map_location="cpu", weights_only=False)
        window_loss = local["window_loss"].to(device)
        _set_rng_state(local["rng"])
        if main:
            print(f"c2c.train: resumed from {resume_from} at step {step}")
    else:
        _seed_everything(config.seed, rank)
    log = _Log(out / "log.jsonl", main, step if resume_from is not None else None)
    fuser.set_step(step)
    model.train()

    lengths = data.lengths
    continuation_lengths = data.continuation_lengths
    eval_batch_size = config.eval_batch_size or config.batch_size
    receiver_pad = receiver_tokenizer.pad_token_id
    sharer_pads = [sharer_tokenizer.pad_token_id]

    def gate_logits() -> list[list[float]]:  # [] for ablation variants without gates
        return fuser.gate_logit.detach().float().view(-1, 2).tolist() if hasattr(fuser, "gate_logit") else []

    def evaluate() -> float | None:
        if len(eval_index) == 0:
            return None
        order = eval_index[np.argsort(-lengths[eval_index], kind="stable")]
        batches = [order[s:s + eval_batch_size] for s in range(0, len(order), eval_batch_size)][rank::world]
        sums = torch.zeros(2, device=device, dtype=torch.float64)
        model.train(False)
        with torch.no_grad(), accelerator.autocast():
            for indices in batches:
                batch = collate_examples([data[i] for i in indices], receiver_pad, sharer_pads).to(device)
                sums[0] += continuation_loss(model, batch).double()
                sums[1] += batch.num_label_tokens
        model.train(True)
        sums = accelerator.reduce(sums, reduction="sum") if world > 1 else sums
        return float(sums[0] / sums[1])

    def save_checkpoint(target: Path, final_save: bool = False) -> None:
        tmp = target.with_name(target.name + ".tmp")
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if not final_save:  # per process: its RNG streams and its share of the loss window
            torch.save({"rng": _rng_state(), "window_loss": window_loss.detach().cpu()}, tmp / f"rng_state_{rank}.pt")
        if main:
            save_fuser(fuser, tmp)
            if not final_save:
                torch.save({"step": step, "epoch": step // steps_per_epoch, "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "window_tokens": window_tokens,
                            "config": run_fields(config), "processes": world, "code_version": version,
                            "elapsed_s": time.perf_counter() - loop_start,
                            "data_fingerprint": data.fingerprint()}, tmp / STATE_NAME)
            else:
                (tmp / RUN_RECORD).write_text(json.dumps({"code_version": version, "modules": list(TRAIN_CODE)}) + "\n")
        accelerator.wait_for_everyone()
        if main:
            shutil.rmtree(target, ignore_errors=True)
            tmp.replace(target)
            if config.keep_checkpoints and not final_save:
                for old in checkpoints(out)[:-config.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def record(**values) -> dict:
        return {"step": step, "epoch": round(step / steps_per_epoch, 4), "lr": values.pop("lr"),
                "temperature": float(fuser.gate_temperature), **values,
                "elapsed_s": round(time.perf_counter() - loop_start, 3), "gate_logits": gate_logits()}

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, desc="training fuser", unit="step",
               disable=not (main and config.progress), dynamic_ncols=True)
    loop_start = time.perf_counter() - elapsed_before  # the log's elapsed_s counts from here
    if step == 0 and config.eval_every:
        log.write(record(lr=scheduler.get_last_lr()[0], eval_loss=evaluate()))

    epoch_cache: dict[int, list[np.ndarray]] = {}
    window_start, window_input_tokens = time.perf_counter(), 0
    while step < total_steps:
        epoch, within = divmod(step, steps_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = batch_order(train_index, lengths, global_batch, seed=config.seed, epoch=epoch,
                                             length_bucketing=config.length_bucketing)
        micro_batches = epoch_cache[epoch][within * config.grad_accum:(within + 1) * config.grad_accum]
        step_tokens = int(sum(continuation_lengths[b].sum() for b in micro_batches))  # all processes, no sync
        lr = scheduler.get_last_lr()[0]
        for i, global_indices in enumerate(micro_batches):
            local = global_indices[rank * config.batch_size:(rank + 1) * config.batch_size]
            batch = collate_examples([data[j] for j in local], receiver_pad, sharer_pads).to(device)
            sync = i == len(micro_batches) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(module):
                loss_sum = module(batch)
                accelerator.backward(loss_sum * (world / step_tokens))
            window_loss = window_loss + loss_sum.detach().float()
        window_tokens += step_tokens
        window_input_tokens += int(sum(lengths[b].sum() for b in micro_batches))
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(module.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        fuser.set_step(step)
        bar.update(1)

        entry = {}
        if step % config.log_every == 0 or step == total_steps:
            total = accelerator.reduce(window_loss.clone(), reduction="sum") if world > 1 else window_loss
            entry["train_loss"] = float(total) / max(window_tokens, 1)  # the one host sync of the window
            entry["tokens_per_s"] = round(window_input_tokens / max(time.perf_counter() - window_start, 1e-9), 1)
            if not math.isfinite(entry["train_loss"]):
                raise FloatingPointError(f"training loss is {entry['train_loss']} at step {step}")
            bar.set_postfix(loss=f"{entry['train_loss']:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}")
            window_loss, window_tokens = torch.zeros((), device=device), 0
            window_start, window_input_tokens = time.perf_counter(), 0
        paused = time.perf_counter()  # evaluation and checkpoints do not count against tokens/s
        if (config.eval_every and step % config.eval_every == 0) or step == total_steps:
            entry["eval_loss"] = evaluate()
        if entry:
            log.write(record(lr=lr, **entry))
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
            save_checkpoint(out / f"checkpoint-{step:06d}")
        window_start += time.perf_counter() - paused
        if on_step is not None:
            on_step(step, {"lr": lr, "temperature": float(fuser.gate_temperature), "epoch": epoch, "fuser": fuser,
                           "model": model, "optimizer": optimizer})
    bar.close()
    save_checkpoint(final, final_save=True)
    if main:
        print(f"c2c.train: done, {total_steps} steps; final fuser in {final}")
    return final


def main(argv: list[str] | None = None) -> None:
    config_path, overrides = parse_args(argv)
    if config_path is None:
        raise SystemExit("usage: python -m c2c.train --config CONFIG.yaml [--key value ...]")
    train(config_path, overrides=overrides)


if __name__ == "__main__":
    main()
