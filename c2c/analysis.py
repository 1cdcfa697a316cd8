"""The paper's analyses that need no evaluation loop: cache transformation and gates.

Cache transformation oracle (spec, "Oracle experiments"): can a small network move a sharer's keys
into the receiver's key space? ``collect_keys`` runs both models on the same prompts and pairs,
per aligned token (``TokenAligner``; the receiver's tokenization is the base, message tokens
only), the sharer's keys of the layer ``layer_map`` assigns to a receiver layer with the receiver's
keys of that layer, heads flattened. ``fit_key_mlp`` fits a 3-layer MLP sharer -> receiver on part
of the tokens; on the held-out rest, ``nn_ratio`` says how far the projected keys (and, for
comparison, the raw sharer keys) sit from the receiver's cloud: the mean distance from each point
to its nearest receiver key, divided by the receiver keys' own mean nearest-neighbour distance.
About 1 (or below) means inside the cloud; raw sharer keys should be far above. ``tsne_points``
embeds receiver, sharer and projected keys together (sklearn t-SNE) and returns coordinates and
labels for a notebook to plot. A trained fuser's projection P can replace the MLP
(``fuser_projection``).

Keys are what the cache holds (after RoPE, as the fuser reads them). Where the sharer's width
(heads x head dim) differs from the receiver's, raw sharer keys are zero-padded (or cut) to the
receiver's width for distances and t-SNE; this is stated in the result (``sharer_padded``).

Gates: ``gate_table`` (one row per receiver layer: K and V gate logits, open at inference) from a
``C2CFuser``; ``gate_history`` the same per logged step from a training log.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from c2c.align import TokenAligner, layer_map as make_layer_map
from c2c.fused import collate, kv_cache, pad_token_id, prefix_cache

# --------------------------------------------------------------------------- keys of both models


@torch.no_grad()
def collect_keys(receiver, receiver_tokenizer, sharer, sharer_tokenizer, chats: Sequence[list[dict]],
                 layers: Sequence[int], *, layer_map: Sequence[int] | None = None, alignment: str = "longest",
                 kind: str = "keys", batch_size: int = 8) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Paired per-token caches of aligned message tokens: receiver layer t -> (sharer (M, Hs*Ds), receiver (M, Hr*Dr)).

    chats: prompts as chats (e.g. ``[c2c.methods.chat_messages(i) for i in items]``), rendered with
    the generation prompt, thinking disabled. layer_map: receiver layer -> sharer layer (default:
    the terminal map). kind: "keys" or "values". Returned in float32 on the CPU.
    """
    if kind not in ("keys", "values"):
        raise ValueError(f"kind must be 'keys' or 'values', got {kind!r}")
    T, S = receiver.config.num_hidden_layers, sharer.config.num_hidden_layers
    mapping = list(layer_map) if layer_map is not None else make_layer_map(T, S)
    bad = [t for t in layers if not 0 <= t < T]
    if bad or not layers:
        raise ValueError(f"layers must be a non-empty list of receiver layers in [0, {T - 1}], got {list(layers)}")
    aligner = TokenAligner(receiver_tokenizer, sharer_tokenizer, strategy=alignment)
    pairs: dict[int, tuple[list, list]] = {t: ([], []) for t in layers}
    for start in range(0, len(chats), batch_size):
        aligned = [[aligner.align_chat(c, add_generation_prompt=True, enable_thinking=False)]
                   for c in chats[start:start + batch_size]]
        inputs = collate(aligned, pad_token_id(receiver_tokenizer),
                         [pad_token_id(sharer_tokenizer)])
        s_in = inputs.sharers[0]
        # the positions a fuser reads: every prompt token but the last (c2c.fused.C2CModel.prefill)
        r_cache = prefix_cache(receiver, inputs.input_ids.to(receiver.device), inputs.attention_mask.to(receiver.device))
        s_cache = kv_cache(sharer, s_in.input_ids.to(sharer.device), s_in.attention_mask.to(sharer.device))
        n = inputs.input_ids.shape[1] - 1
        keep = (s_in.fuse_mask & inputs.attention_mask.bool())[:, :n]  # (B, n) aligned message tokens
        index = s_in.index[:, :n]  # (B, n)
        for t in layers:
            r = getattr(r_cache.layers[t], kind).float().cpu()  # (B, Hr, n, Dr)
            s = getattr(s_cache.layers[mapping[t]], kind).float().cpu()  # (B, Hs, Ns, Ds)
            B, Hs, _, Ds = s.shape
            s = s.gather(2, index.view(B, 1, n, 1).expand(B, Hs, n, Ds))  # (B, Hs, n, Ds)
            pairs[t][0].append(s.permute(0, 2, 1, 3).flatten(2)[keep])  # (m, Hs*Ds)
            pairs[t][1].append(r.permute(0, 2, 1, 3).flatten(2)[keep])  # (m, Hr*Dr)
    return {t: (torch.cat(x), torch.cat(y)) for t, (x, y) in pairs.items()}


# --------------------------------------------------------------------------- the MLP oracle


class KeyMLP(nn.Module):
    """Three linear layers with GELU, on standardised inputs and targets: (M, in) -> (M, out)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 1024):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, out_dim))
        self.register_buffer("x_mean", torch.zeros(in_dim))
        self.register_buffer("x_std", torch.ones(in_dim))
        self.register_buffer("y_mean", torch.zeros(out_dim))
        self.register_buffer("y_std", torch.ones(out_dim))

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        """The prediction in standardised target units."""
        return self.net((x - self.x_mean) / self.x_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalised(x) * self.y_std + self.y_mean


def fit_key_mlp(x: torch.Tensor, y: torch.Tensor, *, hidden: int = 1024, steps: int = 500, lr: float = 1e-3,
                batch_size: int = 1024, weight_decay: float = 0.0, seed: int = 0,
                device: str | torch.device | None = None) -> tuple[KeyMLP, list[float]]:
    """Fit ``KeyMLP`` x (M, in) -> y (M, out) by MSE (standardised units), AdamW; returns it and the loss per step."""
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"need >= 2 paired rows, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = x.float(), y.float()
    mlp = KeyMLP(x.shape[1], y.shape[1], hidden)
    mlp.x_mean.copy_(x.mean(0)), mlp.x_std.copy_(x.std(0).clamp_min(1e-6))
    mlp.y_mean.copy_(y.mean(0)), mlp.y_std.copy_(y.std(0).clamp_min(1e-6))
    mlp.to(device or "cpu")
    x, y = x.to(mlp.x_mean.device), y.to(mlp.x_mean.device)
    target = (y - mlp.y_mean) / mlp.y_std
    optimizer = torch.optim.AdamW(mlp.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        rows = torch.randperm(x.shape[0], generator=generator)[:batch_size].to(x.device)
        loss = F.mse_loss(mlp.normalised(x[rows]), target[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return mlp.eval(), losses


@torch.no_grad()
def fuser_projection(fuser, layer: int, x_sharer: torch.Tensor, x_receiver: torch.Tensor,
                     kind: str = "keys") -> torch.Tensor:
    """A trained fuser's projection P (before weights and gates) for one receiver layer.

    x_sharer (M, Hs*Ds), x_receiver (M, Hr*Dr) as from ``collect_keys``; returns (M, Hr*Dr).
    Eval mode (no dropout). The "projection" variant reads the sharer only.
    """
    g = 2 * layer + (kind == "values")
    p = next(fuser.parameters())
    x = x_sharer if fuser.config.variant == "projection" else torch.cat([x_sharer, x_receiver], dim=-1)
    h = _group_linear(fuser.input, g, x.to(p.device, p.dtype))
    h = _group_block(fuser.shared_block, g, h)
    for block in fuser.projection_blocks:
        h = _group_block(block, g, h)
    return _group_linear(fuser.projection_out, g, h).float().cpu()


def _group_linear(linear, g: int, x: torch.Tensor) -> torch.Tensor:
    y = x @ linear.weight[g]  # (M, in) @ (in, out)
    return y + linear.bias[g] if linear.bias is not None else y


def _group_block(block, g: int, x: torch.Tensor) -> torch.Tensor:
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + block.norm.eps)).to(x.dtype)
    normed = normed * block.norm.weight[g]
    return x + _group_linear(block.w2, g, F.gelu(_group_linear(block.w1, g, normed)))


# --------------------------------------------------------------------------- where the points sit


def _to_width(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad (or cut) the last dimension to ``width``."""
    if x.shape[-1] >= width:
        return x[..., :width]
    return F.pad(x, (0, width - x.shape[-1]))


def _nearest(a: torch.Tensor, b: torch.Tensor, exclude_self: bool, chunk: int = 2048) -> torch.Tensor:
    """(len(a),) distance from each row of a to its nearest row of b."""
    out = []
    for start in range(0, a.shape[0], chunk):
        d = torch.cdist(a[start:start + chunk], b)  # (c, len(b))
        if exclude_self:
            rows = torch.arange(d.shape[0])
            d[rows, rows + start] = float("inf")
        out.append(d.min(dim=1).values)
    return torch.cat(out)


def nn_ratio(points: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean nearest-reference distance of ``points`` / mean nearest-neighbour distance within ``reference``.

    points (M, D'), reference (N, D), N >= 2; points are zero-padded/cut to D. ~1: inside the cloud.
    """
    if reference.shape[0] < 2:
        raise ValueError("nn_ratio needs at least 2 reference points")
    reference = reference.double()
    points = _to_width(points.double(), reference.shape[1])
    own = _nearest(reference, reference, exclude_self=True).mean()
    return float(_nearest(points, reference, exclude_self=False).mean() / own.clamp_min(1e-12))


def tsne_points(groups: Mapping[str, torch.Tensor], *, perplexity: float = 30.0, max_points: int | None = 1000,
                seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """One t-SNE of several point sets: coordinates (M, 2) and a label per row (the group name).

    Sets are zero-padded to the widest; each is subsampled to ``max_points`` rows (the same rows of
    sets of equal length, which are token-aligned here). Perplexity is capped below M / 3.
    """
    from sklearn.manifold import TSNE  # here, not at the top: importing scikit-learn takes seconds; only t-SNE needs it

    width = max(x.shape[1] for x in groups.values())
    generator = torch.Generator().manual_seed(seed)
    picks: dict[int, torch.Tensor] = {}
    arrays, labels = [], []
    for name, x in groups.items():
        n = x.shape[0]
        if max_points is not None and n > max_points:
            if n not in picks:
                picks[n] = torch.randperm(n, generator=generator)[:max_points].sort().values
            x = x[picks[n]]
        arrays.append(_to_width(x.float(), width))
        labels += [name] * x.shape[0]
    data = torch.cat(arrays).numpy()
    if data.shape[0] < 5:
        raise ValueError(f"t-SNE needs at least 5 points, got {data.shape[0]}")
    perplexity = min(perplexity, (data.shape[0] - 1) / 3)
    coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(data)
    return coords, labels


def cache_transformation(receiver, receiver_tokenizer, sharer, sharer_tokenizer, chats: Sequence[list[dict]],
                         layers: Sequence[int], *, layer_map: Sequence[int] | None = None,
                         alignment: str = "longest", kind: str = "keys", holdout: float = 0.2, hidden: int = 1024,
                         steps: int = 500, lr: float = 1e-3, batch_size: int = 8, fit_batch_size: int = 1024,
                         tsne: bool = True, perplexity: float = 30.0, max_points: int | None = 1000, seed: int = 0,
                         device: str | torch.device | None = None, fuser=None) -> list[dict]:
    """The cache transformation oracle for some receiver layers; one dict per layer.

    Per layer: fit the MLP on (1 - holdout) of the aligned tokens (or use ``fuser``'s projection
    instead, then nothing is fitted), project the held-out sharer keys, and measure on the held-out
    tokens. Keys: layer, sharer_layer, n_train, n_test, losses (per step; [] with a fuser),
    nn_ratio_projected, nn_ratio_sharer, sharer_padded, and with ``tsne``: coords (n, 2) and
    labels ("receiver" / "sharer" / "projected") of the held-out tokens.
    """
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    T, S = receiver.config.num_hidden_layers, sharer.config.num_hidden_layers
    mapping = list(layer_map) if layer_map is not None else make_layer_map(T, S)
    pairs = collect_keys(receiver, receiver_tokenizer, sharer, sharer_tokenizer, chats, layers, layer_map=mapping,
                         alignment=alignment, kind=kind, batch_size=batch_size)
    out = []
    for t, (x, y) in pairs.items():
        M = x.shape[0]
        order = torch.randperm(M, generator=torch.Generator().manual_seed(seed))
        n_test = max(2, int(round(holdout * M)))
        test, train = order[:n_test], order[n_test:]
        if fuser is None:
            mlp, losses = fit_key_mlp(x[train], y[train], hidden=hidden, steps=steps, lr=lr,
                                      batch_size=fit_batch_size, seed=seed, device=device)
            with torch.no_grad():
                projected = mlp(x[test].to(mlp.x_mean.device)).float().cpu()
        else:
            losses = []
            projected = fuser_projection(fuser, t, x[test], y[test], kind)
        row = {"layer": t, "sharer_layer": mapping[t], "n_train": 0 if fuser is not None else len(train),
               "n_test": n_test, "losses": losses,
               "nn_ratio_projected": nn_ratio(projected, y[test]), "nn_ratio_sharer": nn_ratio(x[test], y[test]),
               "sharer_padded": x.shape[1] != y.shape[1]}
        if tsne:
            row["coords"], row["labels"] = tsne_points(
                {"receiver": y[test], "sharer": x[test], "projected": projected},
                perplexity=perplexity, max_points=max_points, seed=seed)
        out.append(row)
    return out


def transformation_rows(results: Sequence[dict]) -> list[dict]:
    """Table rows (no arrays) of ``cache_transformation`` results."""
    return [{"layer": r["layer"], "sharer_layer": r["sharer_layer"], "n_train": r["n_train"], "n_test": r["n_test"],
             "first_loss": r["losses"][0] if r["losses"] else None,
             "final_loss": r["losses"][-1] if r["losses"] else None,
             "nn_ratio_projected": r["nn_ratio_projected"], "nn_ratio_sharer": r["nn_ratio_sharer"]}
            for r in results]


# --------------------------------------------------------------------------- gates


def gate_table(fuser) -> list[dict]:
    """One row per receiver layer: key_logit, value_logit, key_open, value_open (open at inference = logit > 0)."""
    if not hasattr(fuser, "gate_logit"):
        raise ValueError(f"this fuser (variant {fuser.config.variant!r}) has no gates")
    logits = fuser.gate_logit.detach().float().cpu().view(-1, 2)  # (L, 2): group 2t is K, 2t+1 is V
    opened = fuser.open_gates().cpu()  # (L, 2)
    return [{"layer": t, "key_logit": float(logits[t, 0]), "value_logit": float(logits[t, 1]),
             "key_open": bool(opened[t, 0]), "value_open": bool(opened[t, 1])} for t in range(logits.shape[0])]


def gate_history(log: str | Path | Sequence[Mapping]) -> list[dict]:
    """Gate logits per logged step and layer from a training log: a ``c2c.train`` run folder, its
    ``log.jsonl``, or its records (each with ``step`` and ``gate_logits`` = [[K, V] per receiver layer]).
    Records without gate logits (none logged, or ``[]`` for a variant without gates) are skipped.
    Rows: step, layer, key_logit, value_logit, key_open, value_open.
    """
    if isinstance(log, (str, Path)):
        path = Path(log)
        if path.is_dir():
            path = path / "log.jsonl"
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        records = list(log)
    rows = []
    for record in records:
        logits = record.get("gate_logits")
        if not logits:
            continue
        if "step" not in record:
            raise ValueError(f"a log record with gate logits has no 'step': {sorted(record)}")
        for layer, (k, v) in enumerate(logits):
            k, v = float(k), float(v)
            rows.append({"step": int(record["step"]), "layer": layer, "key_logit": k, "value_logit": v,
                         "key_open": k > 0, "value_open": v > 0})
    if not rows:
        raise ValueError("the log holds no gate logits")
    return rows
