"""Fuser checkpoints: our own format (`C2CFuser.save_pretrained` / `from_pretrained`, in c2c.fuser), and
import of the published `nics-efc/C2C_Fuser` format.

    fuser.save_pretrained(folder)                                 # ours
    fuser = load_fuser(folder, receiver.config, sharer.config)    # ours or published, detected

Our format, one folder per fuser (one sharer):
    fuser_config.json   FuserConfig: shapes, layer map, hyper-parameters, receiver/sharer names and
                        signatures, alignment strategy, plus "format": "c2c-fuser/1"
    model.safetensors   the stacked weights of `C2CFuser` (group 2t = layer t's keys, 2t+1 its values)

The published format (spec: "Published checkpoint format") keeps one "projector" per receiver layer,
as torch state dicts with per-layer keys; `import_published` maps them onto the stacked layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from c2c.fuser import CONFIG_NAME, C2CFuser, FuserConfig

PUBLISHED_CONFIG_NAME = "projector_config.json"


def load_fuser(folder: str | Path, receiver_config=None, sharer_config=None, *, dtype: torch.dtype | None = None,
               device=None) -> C2CFuser:
    """Load a fuser checkpoint folder, in eval mode: ours (`fuser_config.json`: `C2CFuser.from_pretrained`) or a
    published one (`projector_config.json`: `import_published`). With model configs given, check it fits that
    pair first. A damaged weights file (truncated, or values that are NaN/inf) raises naming the file."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"fuser checkpoint folder {str(folder)!r} does not exist")
    if (folder / CONFIG_NAME).is_file():
        return C2CFuser.from_pretrained(folder, receiver_config, sharer_config, dtype=dtype, device=device)
    if (folder / PUBLISHED_CONFIG_NAME).is_file():
        return import_published(folder, receiver_config, sharer_config, dtype=dtype).to(device=device)
    raise FileNotFoundError(f"{folder} holds neither {CONFIG_NAME} (a checkpoint of ours) nor "
                            f"{PUBLISHED_CONFIG_NAME} (a published C2C checkpoint)")


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
