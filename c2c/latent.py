"""Table 14: several receivers and sharers through one shared latent space (the paper's A.5.2; facts 1.10).

For M sharers and N receivers, M + N modules instead of M x N fusers:

* a ``SharerProjector`` per sharer: each K/V layer of its cache, token by token (heads x head dim flattened), mapped by
  its own linear layer into a latent space of ``latent_dim`` features that every sharer and receiver shares;
* a fuser per receiver: a ``C2CFuser`` whose "sharer" is a latent cache (one head of ``latent_dim``), reading a
  sharer's latent and the receiver's cache at each receiver layer (terminal layer map to that sharer's layers);
* a gate per (sharer, receiver) pair, layer and K/V: the pair's copy of the receiver's fuser shares every weight
  with the receiver's other pairs except its gate logits (``PairFuser``).

With several sharers each adds its gated term computed from the receiver's own cache,
C'_r = C_r + sum_s g_sr * alpha * P_r(U_s, C_r) (``c2c.fused.C2CModel`` with ``multi_sharer="parallel"``). The paper
does not print its fusers' form; this sum is our reading of "each fuser takes all M latent caches".

Training (``train_latent``): every receiver's SFT loss on the same chats with every sharer fused in, summed over
receivers (each the mean over its scored tokens), one optimizer over all modules (the paper: losses summed, all
modules updated together), a training config of ``c2c.train`` (data, fuser options, optimiser, schedule) without its
receiver and sharer. Checkpoints every ``checkpoint_every`` steps (weights, optimizer, schedule, RNG) resume a run.

Export (``export_pair``): a projector and the fuser's first layer are both linear, so their product is the first layer
of an ordinary ``C2CFuser`` for the real pair, exactly (up to rounding): each pair is saved as a standard fuser folder
(``<run>/pairs/<receiver>__<sharer>``), and the evaluation (``c2c.evaluate``; several sharers at once with
``more_sharers`` and ``multi_sharer: parallel``) runs on them unchanged: ``latent_eval_config``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn
from tqdm.auto import tqdm

from c2c.align import TokenAligner, layer_map
from c2c.data import batch_order, collate_examples, load_tokenized, split_indices
from c2c.fused import C2CModel, pad_token_id, sharer_prefix_length
from c2c.fuser import C2CFuser, FuserConfig, StackedLinear, model_signature
from c2c.models import load_model as load_language_model
from c2c.pairs import eval_config_for_pair
from c2c.paths import cache_dir, repo_path, repo_relative
from c2c.prefixes import PrefixStore
from c2c.records import method_records
from c2c.stats import paired_by_id, wilson_interval
from c2c.train import continuation_loss, linear_schedule, optimizer_groups
from c2c.train_config import load_train_config

CONFIG_NAME = "latent_config.json"
WEIGHTS_NAME = "model.safetensors"
STATE_NAME = "training_state.pt"  # optimizer, schedule, RNG and step of a checkpoint


class SharerProjector(nn.Module):
    """One sharer's projector into the latent space: a linear layer per sharer K/V layer (2S of them)."""

    def __init__(self, sharer_layers: int, sharer_width: int, latent_dim: int):
        super().__init__()
        self.linear = StackedLinear(2 * sharer_layers, sharer_width, latent_dim)

    def forward(self, sharer_kv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """sharer_kv (G, B, Hs, N, Ds), its K/V groups ``groups`` (G,) -> the latent cache (G, B, 1, N, latent)."""
        G, B, Hs, N, Ds = sharer_kv.shape
        weight, bias = self.linear.weight[groups], self.linear.bias[groups]  # (G, Hs*Ds, latent), (G, 1, latent)
        x = sharer_kv.to(weight.dtype).permute(0, 1, 3, 2, 4).reshape(G, B * N, Hs * Ds)  # (G, B*N, Hs*Ds)
        return torch.baddbmm(bias, x, weight).view(G, B, N, 1, -1).transpose(2, 3)  # (G, B, 1, N, latent)


class PairFuser(nn.Module):
    """A (receiver, sharer) pair of the latent system, as ``C2CModel`` calls a fuser: the sharer's projector, then
    the receiver's fuser with this pair's gates. ``config``: the pair's own ``FuserConfig`` (the real models' shapes,
    what ``C2CModel`` checks and ``export_pair`` writes)."""

    def __init__(self, projector: SharerProjector, fuser: C2CFuser, config: FuserConfig):
        super().__init__()
        self.projector, self.fuser, self.config = projector, fuser, config

    @property
    def sharer_groups(self) -> torch.Tensor:
        return self.fuser.sharer_groups

    def delta(self, sharer_kv: torch.Tensor, receiver_kv: torch.Tensor,
              fuse_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.fuser.delta(self.projector(sharer_kv, self.fuser.sharer_groups), receiver_kv, fuse_mask)


class LatentSystem(nn.Module):
    """M sharer projectors, N receiver fusers and M x N pair gates. ``receivers`` / ``sharers``: name -> signature
    (``c2c.fuser.model_signature`` of the model's config); ``fuser_options``: ``FuserConfig`` options (hidden_dim,
    gates, ...); ``alignments``: receiver -> sharer -> token alignment (None where the vocabularies are shared)."""

    def __init__(self, receivers: dict[str, dict], sharers: dict[str, dict], latent_dim: int, fuser_options: dict,
                 alignments: dict[str, dict[str, str | None]] | None = None, layer_map_strategy: str = "terminal"):
        super().__init__()
        if not receivers or not sharers:
            raise ValueError("a latent system needs at least one receiver and one sharer")
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}")
        if fuser_options.get("sharer_mlp_layers"):
            raise ValueError("the latent system's projectors are linear (so that each pair exports as a C2CFuser): "
                             "sharer_mlp_layers (C2C-C) is not supported here")
        self.spec = {"receivers": receivers, "sharers": sharers, "latent_dim": latent_dim,
                     "fuser_options": fuser_options, "alignments": alignments or {},
                     "layer_map_strategy": layer_map_strategy}
        self.projectors = nn.ModuleList(
            SharerProjector(s["num_hidden_layers"], s["num_key_value_heads"] * s["head_dim"], latent_dim)
            for s in sharers.values())
        self.fusers = nn.ModuleList()  # per receiver: its pairs' fusers (ModuleList), one per sharer
        self.pairs: list[list[PairFuser]] = []
        for receiver, r in receivers.items():
            row, pairs = nn.ModuleList(), []
            for (sharer, s), projector in zip(sharers.items(), self.projectors):
                mapping = layer_map(r["num_hidden_layers"], s["num_hidden_layers"], layer_map_strategy)
                shapes = {"receiver_layers": r["num_hidden_layers"], "receiver_kv_heads": r["num_key_value_heads"],
                          "receiver_head_dim": r["head_dim"], "layer_map": mapping, **fuser_options}
                fuser = C2CFuser(FuserConfig(sharer_kv_heads=1, sharer_head_dim=latent_dim, **shapes))
                if row:  # the receiver's fuser: every weight shared with its first pair's, the gate logits its own
                    for name, child in row[0].named_children():
                        setattr(fuser, name, child)
                alignment = (alignments or {}).get(receiver, {}).get(sharer)
                config = FuserConfig(sharer_kv_heads=s["num_key_value_heads"], sharer_head_dim=s["head_dim"],
                                     receiver=receiver, sharer=sharer, alignment=alignment, receiver_signature=r,
                                     sharer_signature=s, **shapes)
                row.append(fuser)
                pairs.append(PairFuser(projector, fuser, config))
            self.fusers.append(row)
            self.pairs.append(pairs)

    def set_step(self, step: int) -> None:
        for row in self.fusers:
            for fuser in row:
                fuser.set_step(step)

    def no_weight_decay_parameter_names(self) -> set[str]:
        """The gate logits where the options exempt them from weight decay (``c2c.train.optimizer_groups``)."""
        if not self.spec["fuser_options"].get("exempt_gates_from_weight_decay"):
            return set()
        return {name for name, _ in self.named_parameters() if name.endswith("gate_logit")}

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.spec, indent=1) + "\n", encoding="utf-8")
        save_model(self, str(folder / WEIGHTS_NAME))  # tied tensors are written once
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "LatentSystem":
        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{folder} holds no latent system ({CONFIG_NAME}); train it with train_latent")
        system = cls(**json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")))
        load_model(system, str(folder / WEIGHTS_NAME))
        return system


@torch.no_grad()
def export_pair(system: LatentSystem, receiver: int, sharer: int, folder: str | os.PathLike) -> Path:
    """Save pair (receiver, sharer) as an ordinary ``C2CFuser`` folder: the projector's linear layer multiplied
    into the fuser's first layer (computed in float64)."""
    pair = system.pairs[receiver][sharer]
    state = dict(pair.fuser.state_dict())
    latent = system.spec["latent_dim"]
    groups = pair.sharer_groups
    weight, bias = state["input.weight"].double(), state["input.bias"].double()  # (G, latent + Wr, H), (G, 1, H)
    projector_weight = pair.projector.linear.weight[groups].double()  # (G, Ws, latent)
    projector_bias = pair.projector.linear.bias[groups].double()  # (G, 1, latent)
    from_latent = weight[:, :latent]  # (G, latent, H)
    # (G, Ws + Wr, H): the sharer's rows through the projector, the receiver's as they are
    state["input.weight"] = torch.cat([projector_weight @ from_latent, weight[:, latent:]], dim=1).float()
    state["input.bias"] = (bias + projector_bias @ from_latent).float()
    fuser = C2CFuser(pair.config)
    fuser.load_state_dict(state)
    return fuser.save_pretrained(folder)


def short_name(model: str) -> str:
    """A model's name for folders and table columns: the last part of its path or hub id."""
    return re.sub(r"[^\w.-]+", "-", Path(model).name or model)


def pair_slug(receiver: str, sharer: str) -> str:
    """A folder name for the pair: the two short names, '__' between."""
    return f"{short_name(receiver)}__{short_name(sharer)}"


# --------------------------------------------------------------------------- training


@dataclass
class _Receiver:
    """One receiver's part of a joint run: its C2C model (every sharer fused in through its pairs), tokenized chats,
    their training and held-out indices and the pad ids to collate them."""

    name: str
    model: C2CModel
    chats: object  # c2c.data.TokenizedChats
    train: np.ndarray
    held_out: np.ndarray
    pads: tuple

    def batch(self, indices, device):
        return collate_examples([self.chats[i] for i in indices], *self.pads).to(device)


def _models(sources: list[str], dtype, device) -> dict:
    loaded = {}
    for source in dict.fromkeys(sources):
        model, tokenizer = load_language_model(source, dtype=dtype)
        loaded[source] = (model.to(device), tokenizer)
    return loaded


def train_latent(base_config: str | os.PathLike, receivers: list[str], sharers: list[str], latent_dim: int,
                 output_dir: str | os.PathLike, overrides: dict | None = None, *, progress: bool = True) -> Path:
    """Train the latent system of ``receivers`` x ``sharers`` jointly on ``base_config``'s data and recipe (a
    ``c2c.train`` config; its receiver and sharer are not used; with its ``prefix_cache`` the models' prompt caches
    are kept on disk), resuming from ``output_dir``'s checkpoint; export every pair. Returns ``output_dir``:
    ``final/`` (the system), ``pairs/<slug>/`` (each pair as a fuser folder), ``log.jsonl`` (each step's losses) and
    ``held_out_loss.json`` (each receiver's loss on its held-out chats at the start and the end). A finished run is
    reused; one finished under other settings is refused."""
    config = load_train_config(repo_path(base_config), overrides or {})
    out = repo_path(output_dir)
    settings = {"base_config": repo_relative(repo_path(base_config)), "overrides": overrides or {},
                "receivers": list(receivers), "sharers": list(sharers), "latent_dim": latent_dim}
    settings_file = out / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text(encoding="utf-8")) != settings:
        raise ValueError(f"{out} holds a latent run with other settings ({settings_file}); delete the folder to "
                         "retrain, or give another output_dir")
    if (out / "final" / CONFIG_NAME).is_file():
        print(f"c2c.latent: {repo_relative(out)} already holds the finished run")
        return out
    out.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    cuda = torch.cuda.is_available()
    precision = config.precision if config.precision != "auto" else ("bf16" if cuda else "fp32")
    device = torch.device("cuda" if cuda else "cpu")
    loaded = _models([*receivers, *sharers], torch.bfloat16 if precision == "bf16" else torch.float32, device)
    data = [load_tokenized(config.dataset, loaded[r][1], [loaded[s][1] for s in sharers],
                           max_examples=config.max_examples, alignment=config.alignment, max_length=config.max_length,
                           cache_folder=cache_dir() / "datasets" if config.data_cache else None, progress=progress,
                           answer_prefix=config.answer_prefix) for r in receivers]
    if config.prefix_cache:
        stores = _attach_prompt_caches(loaded, receivers, sharers, data, progress)
        (out / "prompt_caches.json").write_text(json.dumps(stores, indent=1) + "\n", encoding="utf-8")
    splits = [split_indices(len(chats), config.eval_fraction, config.seed) for chats in data]
    steps_per_epoch = min(len(train) for train, _ in splits) // (config.batch_size * config.grad_accum)
    if steps_per_epoch == 0:
        raise ValueError(f"fewer training examples than one step needs ({config.batch_size * config.grad_accum}); "
                         "lower batch_size or grad_accum")
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    fuser_options = dict(config.fuser)
    if fuser_options.get("anneal_steps", "total") == "total":
        fuser_options["anneal_steps"] = total_steps
    alignments = {r: {s: None if TokenAligner(loaded[r][1], loaded[s][1]).shared_vocabulary else config.alignment
                      for s in sharers} for r in receivers}
    torch.manual_seed(config.seed)
    system = LatentSystem({r: model_signature(loaded[r][0].config) for r in receivers},
                          {s: model_signature(loaded[s][0].config) for s in sharers}, latent_dim, fuser_options,
                          alignments, config.layer_map).to(device)
    sharer_models, sharer_tokenizers = [loaded[s][0] for s in sharers], [loaded[s][1] for s in sharers]
    parts = [_Receiver(r, C2CModel(*loaded[r], sharer_models, sharer_tokenizers, system.pairs[j],
                                   alignment=config.alignment, multi_sharer="parallel"),
                       chats, train, held_out,
                       (pad_token_id(loaded[r][1]), [pad_token_id(t) for t in sharer_tokenizers]))
             for j, (r, chats, (train, held_out)) in enumerate(zip(receivers, data, splits))]
    optimizer = torch.optim.AdamW(optimizer_groups(system, config.weight_decay), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(total_steps, math.ceil(config.warmup_ratio * total_steps)))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    step = _resume(out / "checkpoint", system, optimizer, scheduler)
    held_out_file = out / "held_out_loss.json"
    if step == 0:
        held_out_file.write_text(json.dumps({"start": _held_out_loss(system, parts, config, device, autocast)}) + "\n")
    system.set_step(step)
    bar = tqdm(total=total_steps, initial=step, desc="training latent system", unit="step", disable=not progress)
    with _log_from(out / "log.jsonl", step) as log:
        while step < total_steps:
            losses = _optimizer_step(system, optimizer, parts, config, step, steps_per_epoch, device, autocast)
            scheduler.step()
            step += 1
            system.set_step(step)
            log.write(json.dumps({"step": step, "loss": losses, "lr": scheduler.get_last_lr()[0]}) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses.values()):.4f}")
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                _save_checkpoint(out / "checkpoint", system, optimizer, scheduler, step)
    bar.close()
    held_out = json.loads(held_out_file.read_text())
    held_out["end"] = _held_out_loss(system, parts, config, device, autocast)
    held_out_file.write_text(json.dumps(held_out) + "\n")
    system.save_pretrained(out / "final")
    for j, receiver in enumerate(receivers):
        for i, sharer in enumerate(sharers):
            export_pair(system, j, i, out / "pairs" / pair_slug(receiver, sharer))
    print(f"c2c.latent: done, {total_steps} steps; pairs in {repo_relative(out / 'pairs')}")
    return out


def _optimizer_step(system: LatentSystem, optimizer, parts: list[_Receiver], config, step: int, steps_per_epoch: int,
                    device, autocast) -> dict[str, float]:
    """One step of every receiver's loss (its mean over the step's scored tokens; gradient accumulation), summed:
    clipping and AdamW on all modules. Returns each receiver's loss."""
    epoch, within = divmod(step, steps_per_epoch)
    system.train()
    losses = {}
    for part in parts:
        batches = batch_order(part.train, part.chats.lengths, config.batch_size, seed=config.seed, epoch=epoch,
                              length_bucketing=config.length_bucketing)
        micro = batches[within * config.grad_accum:(within + 1) * config.grad_accum]
        tokens = int(sum(part.chats.continuation_lengths[b].sum() for b in micro))
        losses[part.name] = 0.0
        for indices in micro:
            with autocast:
                loss = continuation_loss(part.model, part.batch(indices, device)) / tokens
            loss.backward()  # the receivers' losses add up in the gradients
            losses[part.name] += float(loss.detach())
    if not all(map(math.isfinite, losses.values())):
        raise FloatingPointError(f"training loss is {losses} at step {step + 1}")
    if config.max_grad_norm:
        nn.utils.clip_grad_norm_(system.parameters(), config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses


@torch.no_grad()
def _held_out_loss(system: LatentSystem, parts: list[_Receiver], config, device, autocast) -> dict[str, float | None]:
    """Each receiver's loss per scored token on its held-out chats (None without any), gates at inference."""
    system.eval()
    result = {}
    for part in parts:
        total, tokens = 0.0, 0
        for start in range(0, len(part.held_out), config.batch_size):
            batch = part.batch(part.held_out[start:start + config.batch_size], device)
            with autocast:
                total += float(continuation_loss(part.model, batch))
            tokens += batch.num_label_tokens
        result[part.name] = total / tokens if tokens else None
    return result


@contextlib.contextmanager
def _log_from(path: Path, step: int):
    """The run's log open for appending, keeping the steps up to ``step`` (a stopped run may have logged more)."""
    kept = [line for line in (path.read_text(encoding="utf-8").splitlines() if path.exists() else [])
            if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    with path.open("a", encoding="utf-8") as log:
        yield log


def _attach_prompt_caches(loaded: dict, receivers: list[str], sharers: list[str], data: list,
                          progress: bool) -> dict:
    """One on-disk prompt-cache store per model (``c2c.prefixes``, as ``c2c.train`` with ``prefix_cache``), filled
    with every prompt it prefills in training (each receiver's prompts; each sharer's, aligned to every receiver)
    and attached, so that a step runs only the fusion and the receivers' passes over the answers. Returns each
    store's description by model."""
    rows: dict[str, list] = {}
    for receiver, chats in zip(receivers, data):
        examples = [chats[i] for i in range(len(chats))]
        rows.setdefault(receiver, []).extend(e.prompt_ids[:-1] for e in examples)
        for i, sharer in enumerate(sharers):
            rows.setdefault(sharer, []).extend(e.prompt[i].sharer_ids[:sharer_prefix_length(e.prompt[i])]
                                               for e in examples)
    stores = {}
    for name, sequences in rows.items():
        store = PrefixStore(loaded[name][0], progress=progress)
        store.fill(sequences, desc=f"{short_name(name)} prompt caches")
        stores[name] = store.attach().describe()
    return stores


def _save_checkpoint(folder: Path, system: LatentSystem, optimizer, scheduler, step: int) -> None:
    """Weights and training state, written beside the last checkpoint and then swapped in (a crash keeps one)."""
    partial = folder.with_name(folder.name + ".partial")
    system.save_pretrained(partial)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state()}, partial / STATE_NAME)
    if folder.exists():
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    partial.rename(folder)


def _resume(folder: Path, system: LatentSystem, optimizer, scheduler) -> int:
    """The step of ``folder``'s checkpoint, its weights and state loaded; 0 without one."""
    if not (folder / STATE_NAME).is_file():
        return 0
    load_model(system, str(folder / WEIGHTS_NAME))
    state = torch.load(folder / STATE_NAME, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    np.random.set_state(state["numpy_rng"])
    print(f"c2c.latent: resuming from {repo_relative(folder)} at step {state['step']}")
    return state["step"]


# --------------------------------------------------------------------------- evaluation


def latent_eval_config(base: str | os.PathLike, run: str | os.PathLike, receiver: str, sharers: list[str], *,
                       benchmark: str, limit: int | None) -> dict:
    """An evaluation config (``c2c.evaluate``) for one receiver of a latent run: the receiver alone, C2C with each
    sharer (key ``c2c_<sharer slug>``) and with every sharer at once (``c2c_all``, their terms summed); the base
    config's settings and its entry for ``benchmark``."""
    folders = [repo_path(run) / "pairs" / pair_slug(receiver, s) for s in sharers]
    missing = [str(f) for f in folders if not (f / "fuser_config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"no exported pair fuser in {missing}: train the latent system first (train_latent)")
    config = eval_config_for_pair(base, folders[0], benchmark=benchmark, limit=limit, methods=("receiver",),
                                  name=f"latent-{short_name(receiver)}")
    methods = config["methods"]
    methods += [{"name": "c2c", "key": f"c2c_{short_name(s)}", "sharer": s,
                 "fuser": {"checkpoint": repo_relative(f)}} for s, f in zip(sharers, folders)]
    if len(sharers) > 1:
        methods.append({"name": "c2c", "key": "c2c_all", "sharer": sharers[0],
                        "fuser": {"checkpoint": repo_relative(folders[0])}, "multi_sharer": "parallel",
                        "more_sharers": [{"sharer": s, "fuser": {"checkpoint": repo_relative(f)}}
                                         for s, f in zip(sharers[1:], folders[1:])]})
    return config


def latent_rows(outs: dict[str, str | os.PathLike], sharers: list[str], *, benchmark: str) -> list[dict]:
    """Table 14: a row per sharer setting (none, each sharer, all at once) and, per receiver (``outs``: receiver ->
    its evaluation folder), the accuracy (%) with its 95% interval and, with a sharer, the paired gain over the
    receiver alone (percentage points, exact McNemar p)."""
    settings = [("none", "receiver"), *((short_name(s), f"c2c_{short_name(s)}") for s in sharers)]
    if len(sharers) > 1:
        settings.append(("all", "c2c_all"))
    alone = {receiver: method_records(out, "receiver", benchmark) for receiver, out in outs.items()}
    rows = []
    for label, key in settings:
        row = {"sharers": label}
        for receiver, out in outs.items():
            name = short_name(receiver)
            records = alone[receiver] if key == "receiver" else method_records(out, key, benchmark)
            correct = sum(bool(r["correct"]) for r in records)
            low, high = wilson_interval(correct, len(records))
            row.update({name: 100 * correct / len(records), f"{name}_low": 100 * low, f"{name}_high": 100 * high,
                        f"{name}_n": len(records)})
            if key != "receiver":
                gain = paired_by_id(records, alone[receiver])
                row.update({f"{name}_gain": 100 * gain.difference, f"{name}_gain_p": gain.p_value})
        rows.append(row)
    return rows
