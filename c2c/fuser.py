"""The C2C fuser: projects a sharer's KV-cache into a receiver's cache space and fuses it in under gates.

One fuser per receiver layer, with separate networks for keys and values (spec: "The fuser, one
receiver layer"). All 2 x L networks (L receiver layers, K and V) have identical shapes, so their
weights are stored *stacked* along a leading group axis G = 2 L (group 2t is layer t's key path,
2t+1 its value path) and evaluated together: each step of the network is one batched matmul over
all layers instead of 2 L chains of small kernels. The parameter count is exactly the paper's
(477,848,056 for Qwen3-0.6B <- Qwen2.5-0.5B).

Saved as transformers saves a model: `fuser.save_pretrained(folder)` writes `fuser_config.json` (the
FuserConfig, with "format": "c2c-fuser/1") and `model.safetensors` (the stacked weights);
`C2CFuser.from_pretrained(folder)` loads it. `c2c.checkpoint.load_fuser` loads such a folder or a published
per-layer checkpoint, whichever it finds.

Per group, for X in {K, V} of one receiver layer:
    x_sharer = mlp(x_sharer)                             C2C-C only (sharer_mlp_layers > 0): Linear(Hs*Ds -> H),
                                                         (GELU, Linear(H -> H)) ..., GELU, Linear(H -> Hr*Dr)
    h     = in([x_sharer ; x_receiver])                  Linear(Hs*Ds + Hr*Dr -> H)  (C2C-C: Hr*Dr + Hr*Dr)
    h     = h + Drop(W2 GELU(W1 RMSNorm(h)))             shared block, I = intermediate_dim
    P     = out(proj_blocks(h))                          num_layers - 2 blocks, Linear(H -> Hr*Dr)
    alpha = sigmoid(head(weight_block(h)))               block with I = H, Linear(H -> Hr)
    g     = sigmoid((gate_logit + noise) / tau)  (training) | 1[gate_logit > 0]  (inference)
    X_fused = X_receiver + g * alpha * P
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from c2c.align import check_layer_map, layer_map
from c2c.fingerprint import check_finite

GATE_NOISES = ("gumbel", "logistic")
# the paper's ablation: the projected sharer cache replaces the receiver's ("projection"), is added
# under dynamic weights ("fusion": X_r + alpha * P), or is added under weights and gates ("full")
FUSER_VARIANTS = ("projection", "fusion", "full")
# our checkpoint format: one folder per fuser (`C2CFuser.save_pretrained`)
FORMAT = "c2c-fuser/1"
CONFIG_NAME = "fuser_config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class FuserConfig:
    """Shapes and hyper-parameters of the fusers for one (receiver, sharer) pair."""

    receiver_layers: int
    receiver_kv_heads: int
    receiver_head_dim: int
    sharer_kv_heads: int
    sharer_head_dim: int
    layer_map: list[int]  # receiver layer t reads sharer layer layer_map[t]
    hidden_dim: int = 1024
    intermediate_dim: int = 1024
    num_layers: int = 3  # 1 shared block + (num_layers - 2) projection blocks + the output layer
    dropout: float = 0.1
    gate_noise: str = "gumbel"  # the paper's; "logistic" makes P(open in training) = sigmoid(logit)
    initial_temperature: float = 1.0
    final_temperature: float = 0.001
    anneal_steps: int = 1929
    exempt_gates_from_weight_decay: bool = False  # the paper decays them; True is the fix
    variant: str = "full"  # one of FUSER_VARIANTS; "full" is the paper's C2C fuser
    # C2C-C (paper A.1.3): an MLP of this many Linear layers (width hidden_dim, GELU between) first maps the
    # sharer's K/V to the receiver's width; 0 = the default C2C fuser, 3 = the paper's C2C-C
    sharer_mlp_layers: int = 0
    # provenance, checked when a checkpoint is loaded for a model pair
    receiver: str | None = None
    sharer: str | None = None
    alignment: str | None = None  # token alignment strategy, None for a shared vocabulary
    receiver_signature: dict = field(default_factory=dict)  # model_signature() of the receiver's config
    sharer_signature: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.num_layers < 2:
            raise ValueError(f"num_layers must be >= 2 (one shared block + output), got {self.num_layers}")
        if self.sharer_mlp_layers < 0 or self.sharer_mlp_layers == 1:
            raise ValueError(f"sharer_mlp_layers must be 0 (default C2C) or >= 2 (C2C-C: 3), got {self.sharer_mlp_layers}")
        if self.variant not in FUSER_VARIANTS:
            raise ValueError(f"variant must be one of {FUSER_VARIANTS}, got {self.variant!r}")
        if self.gate_noise not in GATE_NOISES:
            raise ValueError(f"gate_noise must be one of {GATE_NOISES}, got {self.gate_noise!r}")
        if len(self.layer_map) != self.receiver_layers:
            raise ValueError(f"layer_map has {len(self.layer_map)} entries for {self.receiver_layers} receiver layers")

    @classmethod
    def for_models(cls, receiver_config, sharer_config, layer_map: list[int], **options) -> "FuserConfig":
        """Shapes read from two transformers model configs."""
        return cls(
            receiver_layers=receiver_config.num_hidden_layers,
            receiver_kv_heads=receiver_config.num_key_value_heads,
            receiver_head_dim=head_dim(receiver_config),
            sharer_kv_heads=sharer_config.num_key_value_heads,
            sharer_head_dim=head_dim(sharer_config),
            layer_map=list(layer_map),
            receiver_signature=model_signature(receiver_config),
            sharer_signature=model_signature(sharer_config),
            **options,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json_file(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"format": FORMAT, **self.to_dict()}, indent=2))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> FuserConfig:
        """The FuserConfig of a `fuser_config.json`; a malformed file, unknown or missing keys or bad values raise
        a ValueError naming the file and the fix."""
        path = Path(path)
        fix = f"re-save the fuser (save_pretrained) or retrain it, or restore {path} from a good copy"
        try:
            raw = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON ({error}); {fix}") from None
        if not isinstance(raw, dict) or raw.pop("format", None) != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} fuser config (no \"format\": \"{FORMAT}\"); {fix}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown} (written by another version?); known: {sorted(known)}; "
                             f"{fix}")
        try:
            return cls(**raw)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}; {fix}") from None

    def check_fits(self, receiver_config, sharer_config) -> None:
        """Raise a ValueError naming every mismatch between these fusers and a (receiver, sharer) pair."""
        wrong = []
        for side, config, recorded in (("receiver", receiver_config, self.receiver_signature),
                                       ("sharer", sharer_config, self.sharer_signature)):
            actual = model_signature(config)
            expected = recorded or {  # checkpoints without a signature: compare the shapes the fuser uses
                "num_hidden_layers": self.receiver_layers if side == "receiver" else None,
                "num_key_value_heads": getattr(self, f"{side}_kv_heads"),
                "head_dim": getattr(self, f"{side}_head_dim"),
            }
            wrong += [f"{side} {key}: fuser expects {value}, model has {actual.get(key)}"
                      for key, value in expected.items() if value is not None and actual.get(key) != value]
        if wrong:
            raise ValueError(f"fuser does not fit this model pair ({'; '.join(wrong)}); "
                             "use a fuser trained for this receiver/sharer pair")
        check_layer_map(self.layer_map, receiver_config.num_hidden_layers, sharer_config.num_hidden_layers)


def model_signature(model_config) -> dict:
    """The config facts that identify a model's cache layout and vocabulary, recorded in fuser checkpoints."""
    return {
        "model_type": model_config.model_type,
        "num_hidden_layers": model_config.num_hidden_layers,
        "hidden_size": model_config.hidden_size,
        "num_key_value_heads": model_config.num_key_value_heads,
        "head_dim": head_dim(model_config),
        "vocab_size": model_config.vocab_size,
    }


def head_dim(model_config) -> int:
    """Per-head dimension of a transformers config (explicit `head_dim`, else hidden / heads)."""
    explicit = getattr(model_config, "head_dim", None)
    return explicit or model_config.hidden_size // model_config.num_attention_heads


def gate_temperature(step: int, initial: float, final: float, anneal_steps: int) -> float:
    """tau(step) = tau0 * (tauf / tau0) ** min(step / A, 1)."""
    progress = min(step / anneal_steps, 1.0) if anneal_steps > 0 else 1.0
    return initial * (final / initial) ** progress


class StackedLinear(nn.Module):
    """G independent Linear(in -> out) layers applied as one batched matmul: (G, M, in) -> (G, M, out)."""

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(groups, 1, out_features)) if bias else None
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default initialisation, per group
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias, x, self.weight)


class StackedRMSNorm(nn.Module):
    def __init__(self, groups: int, features: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(groups, 1, features))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class StackedResidualBlock(nn.Module):
    """y = x + Dropout(W2 GELU(W1 RMSNorm(x))), bias-free, for G groups at once."""

    def __init__(self, groups: int, features: int, intermediate: int, dropout: float):
        super().__init__()
        self.norm = StackedRMSNorm(groups, features)
        self.w1 = StackedLinear(groups, features, intermediate, bias=False)
        self.w2 = StackedLinear(groups, intermediate, features, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.w2(F.gelu(self.w1(self.norm(x)))))


class StackedMLP(nn.Module):
    """Linear(in -> H), then (GELU, Linear) layers ending at `out`: `layers` Linear layers for G groups at once."""

    def __init__(self, groups: int, in_features: int, hidden: int, out_features: int, layers: int):
        super().__init__()
        widths = [in_features] + [hidden] * (layers - 1) + [out_features]
        self.linears = nn.ModuleList(StackedLinear(groups, a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linears[0](x)
        for linear in self.linears[1:]:
            x = linear(F.gelu(x))
        return x


class C2CFuser(nn.Module):
    """The fusers of every receiver layer for one sharer, K and V paths, with stacked weights."""

    def __init__(self, config: FuserConfig):
        super().__init__()
        self.config = config
        groups = 2 * config.receiver_layers
        sharer_width = config.sharer_kv_heads * config.sharer_head_dim
        receiver_width = config.receiver_kv_heads * config.receiver_head_dim
        hidden = config.hidden_dim
        reads_receiver = config.variant != "projection"
        if config.sharer_mlp_layers:  # C2C-C
            self.sharer_mlp = StackedMLP(groups, sharer_width, hidden, receiver_width, config.sharer_mlp_layers)
            sharer_width = receiver_width
        self.input = StackedLinear(groups, sharer_width + receiver_width * reads_receiver, hidden)
        self.shared_block = StackedResidualBlock(groups, hidden, config.intermediate_dim, config.dropout)
        self.projection_blocks = nn.ModuleList(
            StackedResidualBlock(groups, hidden, config.intermediate_dim, config.dropout)
            for _ in range(config.num_layers - 2)
        )
        self.projection_out = StackedLinear(groups, hidden, receiver_width)
        if config.variant != "projection":
            self.weight_block = StackedResidualBlock(groups, hidden, hidden, config.dropout)
            self.weight_head = StackedLinear(groups, hidden, config.receiver_kv_heads)
        if config.variant == "full":
            self.gate_logit = nn.Parameter(torch.zeros(groups))
        self.register_buffer("gate_temperature", torch.tensor(config.initial_temperature, dtype=torch.float32))
        self.register_index_buffers()

    def register_index_buffers(self, device=None) -> None:
        """(Re)build `sharer_groups` (2L,): the sharer K/V group each group reads (sharer layer s: K = 2s,
        V = 2s + 1). A buffer, so indexing with it on the fuser's device needs no host-to-device copy;
        derived from the config, so not saved (loaders that build on the meta device call this)."""
        layer_map = torch.tensor(self.config.layer_map, device=device)
        self.register_buffer("sharer_groups", torch.stack([2 * layer_map, 2 * layer_map + 1], dim=1).flatten(),
                             persistent=False)

    # ---- gates -------------------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        """Anneal the gate temperature to optimizer step `step` (call after every optimizer step)."""
        c = self.config
        self.gate_temperature.fill_(gate_temperature(step, c.initial_temperature, c.final_temperature, c.anneal_steps))

    def gates(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Gate values broadcastable to (G, B, Hr, N, 1).

        Training: sigmoid((logit + noise) / tau) with noise drawn in float32 per (B, Hr, N) element.
        Inference: hard 0/1 on the sign of the logit (no host synchronisation).
        Variants without gates: always 1.
        """
        if self.config.variant != "full":
            return torch.ones((), device=self.input.weight.device)
        logit = self.gate_logit.float().view(-1, 1, 1, 1, 1)
        if not self.training:
            return (logit > 0).float()
        uniform = torch.rand(shape, device=logit.device, dtype=torch.float32).clamp_(1e-10, 1 - 1e-10)
        if self.config.gate_noise == "gumbel":
            noise = -torch.log(-torch.log(uniform))
        else:  # logistic = difference of two Gumbels
            noise = torch.log(uniform) - torch.log1p(-uniform)
        return torch.sigmoid((logit + noise) / self.gate_temperature)

    def open_gates(self) -> torch.Tensor:
        """(L, 2) bool: which (layer, K/V) gates are open at inference (all, for variants without gates)."""
        if self.config.variant != "full":
            return torch.ones(self.config.receiver_layers, 2, dtype=torch.bool)
        return (self.gate_logit.detach() > 0).view(-1, 2)

    # ---- forward -----------------------------------------------------------------------------
    def delta(self, sharer_kv: torch.Tensor, receiver_kv: torch.Tensor,
              fuse_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The fused-in term g * alpha * P for every layer and K/V at once ("projection" variant: P - X_r).

        sharer_kv:   (G, B, Hs, N, Ds)  sharer keys/values already picked by the layer map and aligned
        receiver_kv: (G, B, Hr, N, Dr)
        fuse_mask:   (B, N) bool, positions to fuse (None = all)
        returns      (G, B, Hr, N, Dr) in receiver_kv's dtype
        """
        G, B, Hs, N, Ds = sharer_kv.shape
        _, _, Hr, _, Dr = receiver_kv.shape
        dtype = self.input.weight.dtype
        x_sharer = sharer_kv.to(dtype).permute(0, 1, 3, 2, 4).reshape(G, B * N, Hs * Ds)  # (G, M, Hs*Ds)
        x_receiver = receiver_kv.to(dtype).permute(0, 1, 3, 2, 4).reshape(G, B * N, Hr * Dr)  # (G, M, Hr*Dr)
        if self.config.sharer_mlp_layers:  # C2C-C
            x_sharer = self.sharer_mlp(x_sharer)  # (G, M, Hr*Dr)
        projection_only = self.config.variant == "projection"
        features = x_sharer if projection_only else torch.cat([x_sharer, x_receiver], dim=-1)
        hidden = self.shared_block(self.input(features))  # (G, M, H)
        projected = hidden
        for block in self.projection_blocks:
            projected = block(projected)
        projected = self.projection_out(projected).view(G, B, N, Hr, Dr).transpose(2, 3)  # (G, B, Hr, N, Dr)
        wide = torch.promote_types(dtype, torch.float32)  # combine in >= fp32
        if projection_only:  # P replaces X_r: the delta is P - X_r
            projected, scale = projected.to(wide) - receiver_kv.to(wide), torch.ones((), device=projected.device)
        else:
            alpha = torch.sigmoid(self.weight_head(self.weight_block(hidden)))  # (G, M, Hr)
            alpha = alpha.view(G, B, N, Hr).transpose(2, 3).unsqueeze(-1)  # (G, B, Hr, N, 1)
            scale = self.gates((G, B, Hr, N, 1)).to(wide) * alpha.to(wide)
        if fuse_mask is not None:
            scale = scale * fuse_mask.view(1, B, 1, N, 1)
        return (scale * projected.to(wide)).to(receiver_kv.dtype)

    def forward(self, sharer_kv: torch.Tensor, receiver_kv: torch.Tensor,
                fuse_mask: torch.Tensor | None = None) -> torch.Tensor:
        """X_fused = X_receiver + g * alpha * P, shapes as in `delta`."""
        return receiver_kv + self.delta(sharer_kv, receiver_kv, fuse_mask)

    # ---- optimiser groups and per-layer view -------------------------------------------------
    def no_weight_decay_parameter_names(self) -> set[str]:
        """Parameters the trainer must exclude from weight decay (the gate logits, if configured)."""
        exempt = self.config.exempt_gates_from_weight_decay and self.config.variant == "full"
        return {"gate_logit"} if exempt else set()

    # ---- saving and loading (transformers' convention) ---------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write `fuser_config.json` and `model.safetensors` into `folder` (created if needed); returns it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.to_json_file(folder / CONFIG_NAME)
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()},
                  folder / WEIGHTS_NAME)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, receiver_config=None, sharer_config=None, *,
                        dtype: torch.dtype | None = None, device=None) -> C2CFuser:
        """A fuser saved by `save_pretrained`, in eval mode; with model configs given, checked to fit that pair
        first. A missing or damaged file (truncated, values that are NaN/inf, shapes other than its config's)
        raises naming the file."""
        folder = Path(folder).expanduser()
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"no {path.name} in {folder}")
        config = FuserConfig.from_json_file(config_path)
        if receiver_config is not None and sharer_config is not None:
            config.check_fits(receiver_config, sharer_config)
        with torch.device("meta"):
            fuser = cls(config)
        fix = "the file is damaged (e.g. a copy cut short); re-save or retrain the fuser, or copy it again"
        try:
            state = load_file(weights_path)
        except SafetensorError as error:
            raise ValueError(f"cannot read {weights_path} ({error}): {fix}") from None
        for name, tensor in state.items():
            check_finite(tensor, f"{weights_path} tensor {name!r}", fix)
        fuser._check_state_dict(state, str(weights_path))
        fuser.load_state_dict(state, assign=True)
        fuser.register_index_buffers()
        return fuser.to(device=device, dtype=dtype).eval()

    def _check_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Strict: the same tensor names and shapes as this fuser's (built from the checkpoint's own config)."""
        expected = {name: tuple(t.shape) for name, t in self.state_dict().items()}
        found = {name: tuple(t.shape) for name, t in state.items()}
        problems = [f"missing {name} {shape}" for name, shape in expected.items() if name not in found]
        problems += [f"unexpected {name}" for name in found if name not in expected]
        problems += [f"{name}: expected shape {shape}, found {found[name]}"
                     for name, shape in expected.items() if name in found and found[name] != shape]
        if problems:
            raise ValueError(f"{source} does not match its {CONFIG_NAME}: " + "; ".join(problems[:10]))


def random_fuser(receiver_config, sharer_config, *, seed: int = 0, gate_logit: float | None = None,
                 layer_map_strategy: str = "terminal", **options) -> C2CFuser:
    """A freshly initialised (seeded) fuser for a model pair, in eval mode.

    gate_logit: set every gate logit (None keeps the paper's initial 0, i.e. closed at inference).
    options: further FuserConfig fields (hidden_dim, intermediate_dim, ...).
    """
    mapping = layer_map(receiver_config.num_hidden_layers, sharer_config.num_hidden_layers, layer_map_strategy)
    config = FuserConfig.for_models(receiver_config, sharer_config, mapping, **options)
    torch.manual_seed(seed)
    fuser = C2CFuser(config).eval()
    if gate_logit is not None:
        with torch.no_grad():
            fuser.gate_logit.fill_(gate_logit)
    return fuser
