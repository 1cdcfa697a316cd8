"""The settings of a training run (`TrainConfig`): defaults, YAML files, `a.b` overrides, types and checks.

    config = load_train_config("configs/train_tiny.yaml", overrides={"fuser.hidden_dim": 64, "max_steps": 10})

A config file holds `TrainConfig` keys; `fuser:` and `receiver_finetune:` / `sharer_finetune:` take the
sub-keys of `FUSER_OPTIONS` / `FINETUNE_OPTIONS`. Values are coerced to the field's type (YAML and the command
line give "1e-4" as a string); an unknown key or a bad value raises a ValueError naming it and the valid ones.
`run_fields` are the keys that define what a run computes (a resumed run must have the same).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from pathlib import Path

import yaml

from c2c.align import LAYER_MAP_STRATEGIES

# FuserConfig options a config may set under `fuser:` (shapes come from the models)
FUSER_OPTIONS: dict[str, type] = {
    "hidden_dim": int, "intermediate_dim": int, "num_layers": int, "dropout": float, "gate_noise": str,
    "initial_temperature": float, "final_temperature": float, "anneal_steps": int,  # or "total"
    "exempt_gates_from_weight_decay": bool, "variant": str, "sharer_mlp_layers": int,
}
# options of `receiver_finetune:` / `sharer_finetune:` (a demo/test aid: fine-tune a copy of the model first,
# cached, c2c.finetune; dataset and max_examples default to the run's, the rest to c2c.finetune.FINETUNE_DEFAULTS)
FINETUNE_OPTIONS: dict[str, type] = {
    "dataset": str, "max_examples": int, "steps": int, "batch_size": int, "learning_rate": float, "seed": int,
}
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
    # score only the first N tokens of each answer turn (1 after answer_prefix: the answer letter alone); None = all
    answer_tokens: int | None = None
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
    if origin in (typing.Union, types.UnionType) and type(None) in args:
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


def load_train_config(source: str | os.PathLike | dict | TrainConfig, overrides: dict | None = None) -> TrainConfig:
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


def config_differences(old: dict, new: dict) -> list[str]:
    """Each key whose value differs, as "key: old -> new" (a missing key counts as None)."""
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
