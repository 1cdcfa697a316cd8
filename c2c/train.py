"""Train C2C fusers: the paper's recipe, resumable, on one device or many (accelerate).

    python -m c2c.train --config configs/train_tiny.yaml [--key value ...] [--fuser.hidden_dim 64]
    accelerate launch -m c2c.train --config configs/train_paper.yaml

or, from Python, `train("configs/train_tiny.yaml")` / `train({...})`, which returns the folder of the
final fuser (`c2c.checkpoint.load_fuser(folder)` loads it). The settings are `c2c.train_config.TrainConfig`;
a config may first fine-tune copies of the models (`c2c.finetune`, for the knowledge-transfer task).

Reading order: `train` is the loop; the pieces it calls follow it (`build_run`: models, data, fuser,
optimizer; `resume`; `optimizer_step`; `evaluate_loss`; `log_record`; `save_checkpoint`), then the loss
(`continuation_loss`) and the optimizer's groups and schedule.

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
    checkpoint-000500/       the fuser (C2CFuser.save_pretrained) + training_state.pt (optimizer, scheduler,
                             step, data position, loss window) + rng_state_<rank>.pt
    final/                   the final fuser (C2CFuser.save_pretrained)
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from c2c.align import TokenAligner, layer_map
from c2c.data import (
    DROP_REASONS,
    TokenizedChats,
    TrainBatch,
    batch_order,
    collate_examples,
    load_tokenized,
    split_indices,
)
from c2c.finetune import finetuned_model_path
from c2c.fingerprint import code_version
from c2c.fused import C2CModel, pad_token_id, sharer_prefix_length
from c2c.fuser import CONFIG_NAME, WEIGHTS_NAME, C2CFuser, FuserConfig
from c2c.jsonl import read_jsonl
from c2c.locks import LOCK_NAME, folder_lock
from c2c.models import load_model
from c2c.paths import cache_dir, repo_relative
from c2c.prefixes import PrefixStore
from c2c.train_config import (FUSER_OPTIONS, TrainConfig, config_differences, load_train_config, parse_args,
                              run_fields)

logger = logging.getLogger(__name__)
# the code that determines what a run computes; a change makes its checkpoints and final fuser stale
TRAIN_CODE = ("c2c.train", "c2c.train_config", "c2c.finetune", "c2c.fuser", "c2c.fused", "c2c.data", "c2c.align",
              "c2c.models")
RUN_RECORD = "training_run.json"  # in final/: the training code version that produced it
STATE_NAME = "training_state.pt"  # in a checkpoint: optimizer, scheduler, step, loss window, ...
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train(config: str | os.PathLike | dict | TrainConfig, *, overrides: dict | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> Path:
    """Train a fuser as `config` says (see `TrainConfig`); returns the final fuser's folder.

    on_step(step, info) is called after every optimizer step (after logging, evaluation and
    checkpointing of that step); info has "lr" (used by this step), "temperature" (after it), "epoch",
    "fuser", "model" (the C2CModel) and "optimizer".
    """
    config = load_train_config(config, overrides)
    main_process = int(os.environ.get("RANK", "0")) == 0  # accelerate / torchrun set RANK; one process: 0
    with folder_lock(config.output_dir, "training run") if main_process else contextlib.nullcontext():
        return _train(config, on_step)


def _train(config: TrainConfig, on_step: Callable[[int, dict], None] | None) -> Path:
    """`train` once the config is checked and (main process) the output folder is locked."""
    version = code_version(*TRAIN_CODE)
    precision = _precision(config)
    accelerator = _accelerator("bf16" if precision == "bf16" else "no")
    out, final = Path(config.output_dir), Path(config.output_dir) / "final"
    if accelerator.is_main_process:
        _prepare_run_folder(out, config)
    accelerator.wait_for_everyone()
    if (final / CONFIG_NAME).exists() and config.resume_from is None:
        _check_finished_run(final, version)
        if accelerator.is_main_process:
            print(f"c2c.train: {repo_relative(out)} already holds the finished run; final fuser in {repo_relative(final)}")
        return final

    run = build_run(config, accelerator, precision, version)
    progress = resume(run)
    log = _Log(out / "log.jsonl", run.main, progress.step if progress.resumed_from is not None else None)
    run.fuser.set_step(progress.step)
    run.model.train()
    bar = tqdm(total=run.total_steps, initial=progress.step, desc="training fuser", unit="step",
               disable=not (run.main and config.progress), dynamic_ncols=True)
    progress.start_clock()  # the log's elapsed_s counts from here
    if progress.step == 0 and config.eval_every:
        log.write(log_record(run, progress, lr=run.scheduler.get_last_lr()[0], eval_loss=evaluate_loss(run)))
    progress.window_start = time.perf_counter()
    while progress.step < run.total_steps:
        epoch, lr = progress.step // run.steps_per_epoch, run.scheduler.get_last_lr()[0]
        optimizer_step(run, progress, run.micro_batches(progress.step))
        bar.update(1)
        step, entry = progress.step, {}
        if step % config.log_every == 0 or step == run.total_steps:
            entry.update(take_train_window(run, progress))
            bar.set_postfix(loss=f"{entry['train_loss']:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}")
        with progress.paused():  # evaluation and checkpoints do not count against tokens/s
            if (config.eval_every and step % config.eval_every == 0) or step == run.total_steps:
                entry["eval_loss"] = evaluate_loss(run)
            if entry:
                log.write(log_record(run, progress, lr=lr, **entry))
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < run.total_steps:
                save_checkpoint(run, progress, out / f"checkpoint-{step:06d}")
        if on_step is not None:
            on_step(step, {"lr": lr, "temperature": float(run.fuser.gate_temperature), "epoch": epoch,
                           "fuser": run.fuser, "model": run.model, "optimizer": run.optimizer})
    bar.close()
    save_checkpoint(run, progress, final, final=True)
    if run.main:
        print(f"c2c.train: done, {run.total_steps} steps; final fuser in {repo_relative(final)}")
    return final


# ---------------------------------------------------------------------------------------------
# Setting up: models, data, fuser, optimizer
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What a run holds fixed once set up: its config and processes, the model (frozen receiver and sharer, the
    fuser) with its optimizer and schedule, and the tokenized examples split into train and eval."""

    config: TrainConfig
    accelerator: Accelerator
    version: str  # code_version(*TRAIN_CODE)
    model: C2CModel
    module: FuserTrainingModule  # what the optimizer trains, as accelerate prepared it (DDP on several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data: TokenizedChats
    train_index: np.ndarray
    eval_index: np.ndarray
    steps_per_epoch: int
    total_steps: int
    lengths: np.ndarray = field(init=False)  # (N,) receiver tokens per example (instruction + continuation)
    continuation_lengths: np.ndarray = field(init=False)  # (N,) scored tokens per example
    _epoch_order: tuple[int, list[np.ndarray]] = field(init=False, default=(-1, []))  # see `micro_batches`

    def __post_init__(self):
        self.lengths, self.continuation_lengths = self.data.lengths, self.data.continuation_lengths

    @property
    def fuser(self) -> C2CFuser:
        return self.model.fusers[0]

    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def micro_batches(self, step: int) -> list[np.ndarray]:
        """The global example indices of each micro-batch of optimizer step `step` (every process's share)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, batch_order(self.train_index, self.lengths, self.config.batch_size * self.world,
                                                    seed=self.config.seed, epoch=epoch,
                                                    length_bucketing=self.config.length_bucketing))
        accum = self.config.grad_accum
        return self._epoch_order[1][within * accum:(within + 1) * accum]

    def batch(self, indices: np.ndarray) -> TrainBatch:
        """Examples `indices`, collated and on this process's device."""
        pads = pad_token_id(self.model.receiver_tokenizer), [pad_token_id(t) for t in self.model.sharer_tokenizers]
        return collate_examples([self.data[i] for i in indices], *pads).to(self.device)


def build_run(config: TrainConfig, accelerator: Accelerator, precision: str, version: str) -> Run:
    """Load the models (fine-tuned copies first, where the config asks) and the data (with prompt caches, where
    it asks), split the data, build the fuser, optimizer and schedule; write data_stats.json."""
    main, world = accelerator.is_main_process, accelerator.num_processes
    if config.model_dtype == "auto":
        model_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    else:
        model_dtype = getattr(torch, config.model_dtype)
    sources = _model_sources(config, accelerator)
    receiver, receiver_tokenizer = load_model(sources["receiver"], dtype=model_dtype)
    sharer, sharer_tokenizer = load_model(sources["sharer"], dtype=model_dtype)
    with accelerator.main_process_first():
        data = load_tokenized(config.dataset, receiver_tokenizer, [sharer_tokenizer], max_examples=config.max_examples,
                              alignment=config.alignment, max_length=config.max_length,
                              cache_folder=cache_dir() / "datasets" if config.data_cache else None,
                              progress=config.progress and main, num_proc=config.num_proc,
                              answer_prefix=config.answer_prefix)
    if config.answer_tokens is not None:
        data = data.first_answer_tokens(config.answer_tokens)
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
        (Path(config.output_dir) / "data_stats.json").write_text(json.dumps(stats, indent=2))

    fuser = _new_fuser(config, receiver, receiver_tokenizer, sharer, sharer_tokenizer, sources, total_steps)
    if precision == "bf16" and not config.fp32_master_weights:
        fuser.to(torch.bfloat16)
    model = C2CModel(receiver, receiver_tokenizer, [sharer], [sharer_tokenizer], [fuser], alignment=config.alignment)
    optimizer = torch.optim.AdamW(optimizer_groups(fuser, config.weight_decay), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, warmup_steps))
    module, optimizer = accelerator.prepare(FuserTrainingModule(model), optimizer)
    receiver.to(accelerator.device)
    sharer.to(accelerator.device)
    return Run(config, accelerator, version, model, module, optimizer, scheduler, data, train_index, eval_index,
               steps_per_epoch, total_steps)


def _precision(config: TrainConfig) -> str:
    """The run's precision, bf16 or fp32 ("auto": bf16 where a GPU is present, else fp32)."""
    if config.precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return config.precision


def _accelerator(mixed_precision: str) -> Accelerator:
    """The run's `accelerate.Accelerator`: one process, or one per device (several CPU processes: gloo)."""
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


def _model_sources(config: TrainConfig, accelerator: Accelerator) -> dict[str, str]:
    """The receiver's and the sharer's model source: the config's, or the folder of the fine-tuned copy of it that
    the config asks for (`receiver_finetune` / `sharer_finetune`, built once by the main process)."""
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
                                                         progress=config.progress and accelerator.is_main_process,
                                                         **options))
    return sources


def _new_fuser(config: TrainConfig, receiver, receiver_tokenizer, sharer, sharer_tokenizer, sources: dict[str, str],
               total_steps: int) -> C2CFuser:
    """A freshly initialised fuser (seeded by the config's seed) for the pair, as the config's `fuser:` says."""
    fuser_options = dict(config.fuser)
    if fuser_options.get("anneal_steps", "total") == "total":
        fuser_options["anneal_steps"] = total_steps
    mapping = layer_map(receiver.config.num_hidden_layers, sharer.config.num_hidden_layers, config.layer_map)
    shared = TokenAligner(receiver_tokenizer, sharer_tokenizer).shared_vocabulary
    fuser_config = FuserConfig.for_models(receiver.config, sharer.config, mapping, receiver=sources["receiver"],
                                          sharer=sources["sharer"], alignment=None if shared else config.alignment,
                                          **fuser_options)
    torch.manual_seed(config.seed)
    return C2CFuser(fuser_config)


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


def _prepare_run_folder(out: Path, config: TrainConfig) -> None:
    """Refuse a folder holding another run (or unrelated files); write config.yaml."""
    config_path = out / "config.yaml"
    if config_path.exists():
        previous = yaml.safe_load(config_path.read_text()) or {}
        diff = config_differences(run_fields(previous), run_fields(config))
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


# ---------------------------------------------------------------------------------------------
# Progress: resuming, one optimizer step, evaluation, the log, checkpoints
# ---------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a run stands. A checkpoint saves step, loss window and elapsed time; a resumed run restores them."""

    window_loss: torch.Tensor  # () this process's summed train loss since the last logged step
    step: int = 0  # optimizer steps done
    window_tokens: int = 0  # scored tokens since the last logged step (all processes)
    elapsed_before: float = 0.0  # seconds the training loop ran before this process started (a resumed run)
    resumed_from: Path | None = None
    # not saved: the clock of the log's elapsed_s, and the tokens/s window
    clock_start: float = 0.0
    window_start: float = 0.0
    window_input_tokens: int = 0

    def start_clock(self) -> None:
        self.clock_start = time.perf_counter() - self.elapsed_before

    def elapsed(self) -> float:
        """Seconds of the training loop so far (before a resume included)."""
        return time.perf_counter() - self.clock_start

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is left out of the tokens/s window (not out of `elapsed`)."""
        start = time.perf_counter()
        yield
        self.window_start += time.perf_counter() - start


def resume(run: Run) -> Progress:
    """Where the run starts: the checkpoint the config names (`resume_from`), else the latest good one in the run
    folder (`resume: true`), restored exactly (fuser, optimizer, schedule, loss window, every RNG stream); else
    step 0 with every RNG seeded."""
    config = run.config
    if config.resume_from:
        folder = Path(config.resume_from)
        problem = checkpoint_problem(folder, run.world)
        if problem:
            raise ValueError(f"cannot resume from {folder}: {problem}; choose another checkpoint in "
                             "resume_from, or set it to null to resume from the latest good one")
    elif config.resume:
        folder = _latest_good_checkpoint(run.out, run.world)
    else:
        folder = None
    if folder is None:
        _seed_everything(config.seed, run.rank)
        return Progress(window_loss=torch.zeros((), device=run.device))
    state = _training_state(run, folder)
    run.fuser.load_state_dict({k: v.to(run.device) for k, v in load_file(folder / WEIGHTS_NAME).items()})
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    local = torch.load(folder / f"rng_state_{run.rank}.pt", map_location="cpu", weights_only=False)
    _set_rng_state(local["rng"])
    if run.main:
        print(f"c2c.train: resumed from {repo_relative(folder)} at step {state['step']}")
    return Progress(window_loss=local["window_loss"].to(run.device), step=state["step"],
                    window_tokens=state["window_tokens"], elapsed_before=state["elapsed_s"], resumed_from=folder)


def _training_state(run: Run, folder: Path) -> dict:
    """A checkpoint's training state, once it is known to belong to this run: the same model pair, config, training
    code, number of processes and tokenized data."""
    _check_checkpoint_pair(folder, run.model.receiver, run.model.sharers[0], run.config)
    try:
        state = torch.load(folder / STATE_NAME, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"{folder / STATE_NAME} is damaged ({error}); delete {folder} to resume from "
                         "the checkpoint before it") from None
    diff = config_differences(state["config"], run_fields(run.config))
    if diff:
        raise ValueError(f"cannot resume from {folder}: it belongs to a run with another config "
                         f"({'; '.join(diff)})")
    if state.get("code_version") != run.version:
        raise ValueError(f"cannot resume from {folder}: it was written by other training code (code "
                         f"version {state.get('code_version')}, now {run.version}: {', '.join(TRAIN_CODE)}); one "
                         f"run's steps come from one version of the code. Delete {run.out} to retrain, or use "
                         "another output_dir.")
    if state["processes"] != run.world:
        raise ValueError(f"cannot resume exactly from {folder}: it was saved by {state['processes']} "
                         f"processes, this run has {run.world} (the data order depends on the global batch)")
    if state["data_fingerprint"] != run.data.fingerprint():
        raise ValueError(f"cannot resume from {folder}: the tokenized dataset differs from the one it was "
                         "trained on")
    return state  # its elapsed_s is there: written by this code version (checked above)


def optimizer_step(run: Run, progress: Progress, micro_batches: list[np.ndarray]) -> None:
    """One optimizer step: forward and backward over the step's micro-batches (gradient accumulation; the loss is
    the mean over the step's scored tokens on every process), clipping, AdamW, the schedule, the gate temperature."""
    config, accelerator = run.config, run.accelerator
    step_tokens = int(sum(run.continuation_lengths[b].sum() for b in micro_batches))  # all processes, no sync
    for i, global_indices in enumerate(micro_batches):
        batch = run.batch(global_indices[run.rank * config.batch_size:(run.rank + 1) * config.batch_size])
        sync = i == len(micro_batches) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(run.module):
            loss_sum = run.module(batch)
            accelerator.backward(loss_sum * (run.world / step_tokens))
        progress.window_loss = progress.window_loss + loss_sum.detach().float()
    progress.window_tokens += step_tokens
    progress.window_input_tokens += int(sum(run.lengths[b].sum() for b in micro_batches))
    if config.max_grad_norm:
        accelerator.clip_grad_norm_(run.module.parameters(), config.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    run.fuser.set_step(progress.step)


def take_train_window(run: Run, progress: Progress) -> dict:
    """train_loss (per scored token, all processes) and tokens_per_s since the last logged step; a new window
    starts. A loss that is not finite stops the run."""
    total = progress.window_loss
    if run.world > 1:
        total = run.accelerator.reduce(total.clone(), reduction="sum")
    train_loss = float(total) / max(progress.window_tokens, 1)  # the one host sync of the window
    seconds = max(time.perf_counter() - progress.window_start, 1e-9)
    entry = {"train_loss": train_loss, "tokens_per_s": round(progress.window_input_tokens / seconds, 1)}
    if not math.isfinite(entry["train_loss"]):
        raise FloatingPointError(f"training loss is {entry['train_loss']} at step {progress.step}")
    progress.window_loss, progress.window_tokens = torch.zeros((), device=run.device), 0
    progress.window_start, progress.window_input_tokens = time.perf_counter(), 0
    return entry


def evaluate_loss(run: Run) -> float | None:
    """The receiver's loss per scored token over the eval examples (all processes), or None without any."""
    if len(run.eval_index) == 0:
        return None
    batch_size = run.config.eval_batch_size or run.config.batch_size
    order = run.eval_index[np.argsort(-run.lengths[run.eval_index], kind="stable")]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)][run.rank::run.world]
    sums = torch.zeros(2, device=run.device, dtype=torch.float64)  # loss sum, scored tokens
    run.model.train(False)
    with torch.no_grad(), run.accelerator.autocast():
        for indices in batches:
            batch = run.batch(indices)
            sums[0] += continuation_loss(run.model, batch).double()
            sums[1] += batch.num_label_tokens
    run.model.train(True)
    sums = run.accelerator.reduce(sums, reduction="sum") if run.world > 1 else sums
    return float(sums[0] / sums[1])


def log_record(run: Run, progress: Progress, *, lr: float, **values) -> dict:
    """One line of log.jsonl: the step, its lr and gate temperature, `values` (losses, tokens/s), the loop's
    elapsed seconds and the gate logits ([K, V] per receiver layer; [] for a variant without gates)."""
    fuser = run.fuser
    gate_logits = fuser.gate_logit.detach().float().view(-1, 2).tolist() if hasattr(fuser, "gate_logit") else []
    return {"step": progress.step, "epoch": round(progress.step / run.steps_per_epoch, 4), "lr": lr,
            "temperature": float(fuser.gate_temperature), **values, "elapsed_s": round(progress.elapsed(), 3),
            "gate_logits": gate_logits}


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


def save_checkpoint(run: Run, progress: Progress, target: Path, *, final: bool = False) -> None:
    """Write the fuser to `target` through a temporary folder (a crash never leaves half of one): with the training
    state and every process's RNG streams, or, for the final fuser, with the training code version instead."""
    accelerator = run.accelerator
    tmp = target.with_name(target.name + ".tmp")
    if run.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if not final:  # per process: its RNG streams and its share of the loss window
        torch.save({"rng": _rng_state(), "window_loss": progress.window_loss.detach().cpu()},
                   tmp / f"rng_state_{run.rank}.pt")
    if run.main:
        run.fuser.save_pretrained(tmp)
        if not final:
            torch.save({"step": progress.step, "epoch": progress.step // run.steps_per_epoch,
                        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                        "window_tokens": progress.window_tokens, "config": run_fields(run.config),
                        "processes": run.world, "code_version": run.version, "elapsed_s": progress.elapsed(),
                        "data_fingerprint": run.data.fingerprint()}, tmp / STATE_NAME)
        else:
            (tmp / RUN_RECORD).write_text(json.dumps({"code_version": run.version, "modules": list(TRAIN_CODE)}) + "\n")
    accelerator.wait_for_everyone()
    if run.main:
        shutil.rmtree(target, ignore_errors=True)
        tmp.replace(target)
        if run.config.keep_checkpoints and not final:
            for old in checkpoints(run.out)[:-run.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


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
    for name in (CONFIG_NAME, WEIGHTS_NAME, STATE_NAME, *(f"rng_state_{r}.pt" for r in range(processes))):
        if not (folder / name).is_file():
            return f"{name} is missing"
    try:
        with safe_open(str(folder / WEIGHTS_NAME), "pt"):
            pass
    except SafetensorError as error:
        return f"{WEIGHTS_NAME} is damaged ({error})"
    try:
        FuserConfig.from_json_file(folder / CONFIG_NAME)
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
    recorded = FuserConfig.from_json_file(path)
    try:
        recorded.check_fits(receiver.config, sharer.config)
    except ValueError as error:
        raise ValueError(f"cannot resume from {folder}: it was trained for receiver {recorded.receiver!r} <- "
                         f"sharer {recorded.sharer!r}, this run is receiver {config.receiver!r} <- sharer "
                         f"{config.sharer!r} ({error})") from None


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


USAGE = "usage: python -m c2c.train --config CONFIG.yaml [--key value ...]"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        keys = ", ".join(key.name for key in fields(TrainConfig))
        print(f"{USAGE}\n\nTrain a fuser from a training config (configs/*.yaml); --key value overrides one of its keys "
              f"(fuser.<option> for the fuser's). Keys: {keys}.\nFuser options: {', '.join(FUSER_OPTIONS)}.")
        return
    config_path, overrides = parse_args(argv)
    if config_path is None:
        raise SystemExit(USAGE)
    train(config_path, overrides=overrides)


if __name__ == "__main__":
    main()
