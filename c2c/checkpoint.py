"""Fuser checkpoints: our own safetensors format, and import of the published `nics-efc/C2C_Fuser` format.

    save_fuser(fuser, folder)                       # ours
    fuser = load_fuser(folder, receiver.config, sharer.config)   # ours or published, detected

Our format, one folder per fuser (one sharer):
    fuser_config.json   FuserConfig: shapes, layer map, hyper-parameters, receiver/sharer names and
                        signatures, alignment strategy, plus "format": "c2c-fuser/1"
    model.safetensors   the stacked weights of `C2CFuser` (group 2t = layer t's keys, 2t+1 its values)

The published format (spec: "Published checkpoint format") keeps one "projector" per receiver layer,
as torch state dicts with per-layer keys; `import_published` maps them onto the stacked layout.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from c2c.fingerprint import check_finite
from c2c.fuser import C2CFuser, FuserConfig

FORMAT = "c2c-fuser/1"
CONFIG_NAME = "fuser_config.json"
WEIGHTS_NAME = "model.safetensors"
PUBLISHED_CONFIG_NAME = "projector_config.json"


def save_fuser(fuser: C2CFuser, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps({"format": FORMAT, **fuser.config.to_dict()}, indent=2))
    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in fuser.state_dict().items()},
              folder / WEIGHTS_NAME)
    return folder


def _check_state_dict(fuser: C2CFuser, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict: the same tensor names and shapes as the fuser built from the checkpoint's own config."""
    expected = {name: tuple(t.shape) for name, t in fuser.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    problems = [f"missing {name} {shape}" for name, shape in expected.items() if name not in found]
    problems += [f"unexpected {name}" for name in found if name not in expected]
    problems += [f"{name}: expected shape {shape}, found {found[name]}"
                 for name, shape in expected.items() if name in found and found[name] != shape]
    if problems:
        raise ValueError(f"{source} does not match its fuser_config.json: " + "; ".join(problems[:10]))


def read_fuser_config(path: str | Path) -> FuserConfig:
    """The FuserConfig of a `fuser_config.json`; a malformed file, unknown or missing keys or bad values raise
    a ValueError naming the file and the fix."""
    path = Path(path)
    fix = f"re-save the fuser (save_fuser) or retrain it, or restore {path} from a good copy"
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {fix}") from None
    if not isinstance(raw, dict) or raw.pop("format", None) != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} fuser config (no \"format\": \"{FORMAT}\"); {fix}")
    known = {f.name for f in dataclasses.fields(FuserConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} (written by another version?); known: {sorted(known)}; {fix}")
    try:
        return FuserConfig(**raw)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}; {fix}") from None


def load_fuser(folder: str | Path, receiver_config=None, sharer_config=None, *, dtype: torch.dtype | None = None,
               device=None) -> C2CFuser:
    """Load a fuser checkpoint folder, in eval mode: ours (`fuser_config.json`, written by `save_fuser`) or a
    published one (`projector_config.json`, see `import_published`). With model configs given, check it fits
    that pair first. A damaged weights file (truncated, or values that are NaN/inf) raises naming the file."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"fuser checkpoint folder {str(folder)!r} does not exist")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file():
        if (folder / PUBLISHED_CONFIG_NAME).is_file():
            return import_published(folder, receiver_config, sharer_config, dtype=dtype).to(device=device)
        raise FileNotFoundError(f"{folder} holds neither {CONFIG_NAME} (a checkpoint of ours) nor "
                                f"{PUBLISHED_CONFIG_NAME} (a published C2C checkpoint)")
    if not weights_path.exists():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}")
    config = read_fuser_config(config_path)
    if receiver_config is not None and sharer_config is not None:
        config.check_fits(receiver_config, sharer_config)
    with torch.device("meta"):
        fuser = C2CFuser(config)
    fix = "the file is damaged (e.g. a copy cut short); re-save or retrain the fuser, or copy it again"
    try:
        state = load_file(weights_path)
    except SafetensorError as error:
        raise ValueError(f"cannot read {weights_path} ({error}): {fix}") from None
    for name, tensor in state.items():
        check_finite(tensor, f"{weights_path} tensor {name!r}", fix)
    _check_state_dict(fuser, state, str(weights_path))
    fuser.load_state_dict(state, assign=True)
    fuser.register_index_buffers()
    return fuser.to(device=device, dtype=dtype).eval()


# ---- the published format ----------------------------------------------------------------------
# published per-layer module prefix -> our stacked module path (for p in {key, value})
PUBLISHED_MODULES = {
    "in": "input",
    "mlp1.blocks.0": "shared_block",
    "proj_out": "projection_out",
    "scalar_mlp2.blocks.0": "weight_block",
    "scalar_head": "weight_head",
}
PUBLISHED_BLOCK_TENSORS = {"norm.weight": "norm.weight", "w1.weight": "w1.weight", "w2.weight": "w2.weight"}


def published_key_map(num_layers: int) -> dict[str, str]:
    """Published per-projector key (without the key_/value_ prefix) -> our stacked parameter name."""
    mapping = {}
    modules = dict(PUBLISHED_MODULES)
    modules.update({f"proj_mlp2.blocks.{b}": f"projection_blocks.{b}" for b in range(num_layers - 2)})
    for theirs, ours in modules.items():
        if "blocks" in theirs:
            mapping.update({f"{theirs}.{t}": f"{ours}.{o}" for t, o in PUBLISHED_BLOCK_TENSORS.items()})
        else:
            mapping.update({f"{theirs}.weight": f"{ours}.weight", f"{theirs}.bias": f"{ours}.bias"})
    mapping["gate_logit"] = "gate_logit"
    return mapping


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"published checkpoint file missing: {path}")
    return json.loads(path.read_text())


def import_published(folder: str | Path, receiver_config=None, sharer_config=None, *, receiver_index: int = 0,
                     sharer_index: int = 1, dtype: torch.dtype | None = None) -> C2CFuser:
    """Load a published C2C fuser folder (`projector_{i}.pt/.json`, `projector_config.json`) as a `C2CFuser`.

    `projector_config.json` maps receiver index -> sharer index -> receiver layer -> [[sharer layer, projector]];
    each receiver layer must read exactly one sharer layer. With model configs given, the result is
    checked against that pair (layers, heads, head dims).
    """
    folder = Path(folder)
    layout = _read_json(folder / PUBLISHED_CONFIG_NAME)
    try:
        per_layer = layout[str(receiver_index)][str(sharer_index)]
    except KeyError:
        raise ValueError(f"{folder / PUBLISHED_CONFIG_NAME} has no entry for receiver {receiver_index} <- sharer "
                         f"{sharer_index}; it holds {json.dumps({k: list(v) for k, v in layout.items()})}") from None
    receiver_layers = len(per_layer)
    if sorted(int(t) for t in per_layer) != list(range(receiver_layers)):
        raise ValueError(f"projector_config.json does not cover receiver layers 0..{receiver_layers - 1}")
    layer_map, projector_of_layer = [], []
    for t in range(receiver_layers):
        entries = per_layer[str(t)]
        if len(entries) != 1:
            raise ValueError(f"receiver layer {t} reads {len(entries)} sharer layers; only one per layer is supported")
        layer_map.append(int(entries[0][0]))
        projector_of_layer.append(int(entries[0][1]))

    args = _read_json(folder / f"projector_{projector_of_layer[0]}.json")["init_args"]
    config = FuserConfig(
        receiver_layers=receiver_layers,
        receiver_kv_heads=args["target_num_heads"], receiver_head_dim=args["target_dim"],
        sharer_kv_heads=args["source_num_heads"], sharer_head_dim=args["source_dim"],
        layer_map=layer_map, hidden_dim=args["hidden_dim"], intermediate_dim=args["intermediate_dim"],
        num_layers=args["num_layers"], dropout=args["dropout"],
        initial_temperature=args["initial_temperature"], final_temperature=args["final_temperature"],
        anneal_steps=args["anneal_steps"],
    )
    if receiver_config is not None and sharer_config is not None:
        config.check_fits(receiver_config, sharer_config)

    states = {p: torch.load(folder / f"projector_{p}.pt", map_location="cpu", weights_only=True)
              for p in sorted(set(projector_of_layer))}
    stored_dtype = states[projector_of_layer[0]].get("key_in.weight", torch.empty(0)).dtype
    with torch.device("meta"):
        fuser = C2CFuser(config)
    fuser = fuser.to_empty(device="cpu").to(stored_dtype)  # every value is overwritten below, exactly
    fuser.register_index_buffers()
    stacked = fuser.state_dict()
    key_map = published_key_map(config.num_layers)
    for t, projector in enumerate(projector_of_layer):
        state = states[projector]
        expected = {f"{p}_{k}" for p in ("key", "value") for k in key_map} | {"gate_temperature"}
        if set(state) != expected:
            raise ValueError(f"projector_{projector}.pt keys differ from the published layout: missing "
                             f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}")
        for path_index, p in enumerate(("key", "value")):
            group = 2 * t + path_index
            for theirs, ours in key_map.items():
                tensor = state[f"{p}_{theirs}"]
                target = stacked[ours][group]
                if ours.endswith("weight") and tensor.dim() == 2:  # nn.Linear stores (out, in); we store (in, out)
                    tensor = tensor.t()
                if tensor.numel() != target.numel():
                    raise ValueError(f"projector_{projector}.pt {p}_{theirs}: {tuple(tensor.shape)} does not fit "
                                     f"the fuser shape {tuple(target.shape)} from its init_args")
                target.copy_(tensor.reshape(target.shape))
        stacked["gate_temperature"].copy_(state["gate_temperature"].reshape(()))
    return fuser.to(dtype=dtype).eval()
