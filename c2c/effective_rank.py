"""Effective rank of KV caches: the paper's Table 2 (averages) and Figure 12 (per layer).

erank(W) = exp(H(p)) with p_i = sigma_i / sum_j sigma_j over the singular values of W (Roy & Vetterli,
2007): 1 for a rank-one matrix, n for n equal singular values (an identity), never above min(M, N).

What W is here (the paper does not say): one matrix per prompt, receiver layer, K or V, and cache,
of shape (tokens, KV heads * head dim) -- the cached vectors of the prompt's fused positions, heads
flattened, not centred. A layer's value is the mean over prompts; the table's average is the mean of
those over the receiver's layers. The three caches are read at the same positions, the receiver
prompt positions C2C fuses (every prompt token but the last; message tokens only for a sharer with
another tokenizer):

* ``receiver``: the receiver's own cache;
* ``sharer``: the sharer's cache at the layer the fuser's layer map pairs with each receiver layer,
  at the sharer token aligned with each receiver position (so its width is the sharer's);
* ``fused``: the receiver's cache after fusion (``C2CModel.prefill``), what the receiver answers from.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from c2c.fused import C2CModel, FusedInputs, _stack_kv, prefix_cache

CACHES = ("sharer", "receiver", "fused")
KINDS = ("key", "value")


def effective_rank(matrix: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values of a 2-D matrix (computed in float64)."""
    if matrix.dim() != 2:
        raise ValueError(f"effective_rank needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    singular = torch.linalg.svdvals(matrix.detach().double().cpu())
    total = singular.sum()
    if not torch.isfinite(total) or total <= 0:
        raise ValueError(f"effective rank is undefined for a matrix whose singular values sum to {float(total)}")
    p = singular / total
    p = p[p > 0]  # 0 log 0 = 0
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def cache_effective_ranks(model: C2CModel, inputs: FusedInputs) -> list[dict]:
    """One row per (prompt, receiver layer, K/V, cache): prompt (batch row), layer, kind, cache, tokens, erank.

    model: a C2CModel with one sharer; inputs: its prepared batch, on the model's device.
    """
    if len(model.sharers) != 1:
        raise ValueError(f"cache_effective_ranks reads one sharer's cache; this model has {len(model.sharers)}")
    n = inputs.input_ids.shape[1] - 1  # the cached prompt positions (all but the last token)
    caches = {
        "receiver": _stack_kv(prefix_cache(model.receiver, inputs.input_ids, inputs.attention_mask)),  # (2L, B, Hr, n, Dr)
        "sharer": model._sharer_kv(0, inputs.sharers[0], n),  # (2L, B, Hs, n, Ds), aligned, by the layer map
        "fused": _stack_kv(model.prefill(inputs)),  # (2L, B, Hr, n, Dr)
    }
    fused_positions = inputs.sharers[0].fuse_mask[:, :n] & inputs.attention_mask[:, :n].bool()  # (B, n)
    rows = []
    for b in range(inputs.input_ids.shape[0]):
        keep = fused_positions[b]
        tokens = int(keep.sum())
        if tokens == 0:
            raise ValueError(f"prompt {b} of the batch has no fused positions")
        for group in range(caches["receiver"].shape[0]):
            for name in CACHES:
                x = caches[name][group, b][:, keep]  # (H, tokens, D)
                matrix = x.permute(1, 0, 2).reshape(tokens, -1)  # (tokens, H * D)
                rows.append({"prompt": b, "layer": group // 2, "kind": KINDS[group % 2], "cache": name,
                             "tokens": tokens, "erank": effective_rank(matrix)})
    return rows


def erank_by_layer(rows: list[dict]) -> list[dict]:
    """Figure 12's data: per (layer, kind), each cache's erank averaged over prompts (and the prompt count)."""
    values = defaultdict(list)
    for row in rows:
        values[(row["layer"], row["kind"], row["cache"])].append(row["erank"])
    layers = sorted({row["layer"] for row in rows})
    out = []
    for layer in layers:
        for kind in KINDS:
            entry = {"layer": layer, "kind": kind}
            for cache in CACHES:
                found = values[(layer, kind, cache)]
                entry[cache] = sum(found) / len(found)
            entry["prompts"] = len(values[(layer, kind, "receiver")])
            out.append(entry)
    return out


def erank_table(by_layer: list[dict]) -> list[dict]:
    """Table 2: per kind (K, V), each cache's per-layer value averaged over the layers, and fused - receiver."""
    out = []
    for kind in KINDS:
        layers = [row for row in by_layer if row["kind"] == kind]
        entry = {"cache": f"{kind[0].upper()} cache"}
        for cache in CACHES:
            entry[cache] = sum(row[cache] for row in layers) / len(layers)
        entry["fused_minus_receiver"] = entry["fused"] - entry["receiver"]
        entry["layers"] = len(layers)
        out.append(entry)
    return out
