"""Gate statistics of fusers (the paper's appendix A.4.2, reported in its text only).

The paper: after general (OpenHermes) training, >98.21% of the key and value gates are open; after
MMLU-auxiliary training, 52.67%, and in open layers most mean dynamic weights are above 0.4 (some
layers' mean key weight is below 0.1 after general training). Its "activation ratio" is not defined
precisely; here it is the fraction of the per-layer gates that are open at inference (logit > 0),
for K, for V and for both together.

``gate_summary`` reads a fuser's gates. ``record_dynamic_weights`` captures the dynamic weights
(alpha = sigmoid of the head-modulation layer, one per receiver KV head and position) every time the
fuser fuses inside the block, at the positions it fuses; ``dynamic_weight_table`` averages them per
layer, for K and V.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from c2c.analysis import gate_table
from c2c.fuser import C2CFuser


def gate_summary(fuser: C2CFuser, name: str) -> dict:
    """One row: the fuser's name, its layers, and the fractions of K, V and all gates open at inference."""
    rows = gate_table(fuser)
    keys, values = sum(r["key_open"] for r in rows), sum(r["value_open"] for r in rows)
    layers = len(rows)
    return {"fuser": name, "layers": layers, "key_open": keys / layers, "value_open": values / layers,
            "all_open": (keys + values) / (2 * layers), "gate_noise": fuser.config.gate_noise}


@contextmanager
def record_dynamic_weights(fuser: C2CFuser):
    """Yields a list that gets, per fusion call inside the block, (alpha (2L, B, N, Hr), fuse_mask (B, N)) on the CPU.

    It wraps the fuser's ``delta`` and reads the head-modulation layer's output with a forward hook; both are
    removed on exit.
    """
    if fuser.config.variant != "full":
        raise ValueError(f"a {fuser.config.variant!r} fuser has no dynamic weights")
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    outputs: list[torch.Tensor] = []
    handle = fuser.weight_head.register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
    delta = fuser.delta

    def recording_delta(sharer_kv, receiver_kv, fuse_mask=None):
        outputs.clear()
        result = delta(sharer_kv, receiver_kv, fuse_mask)
        G, B, _, N, _ = receiver_kv.shape
        alpha = torch.sigmoid(outputs[0].float()).view(G, B, N, -1)  # (2L, B, N, Hr)
        mask = torch.ones(B, N, dtype=torch.bool) if fuse_mask is None else fuse_mask.bool()
        calls.append((alpha.cpu(), mask.cpu()))
        return result

    fuser.delta = recording_delta  # an instance attribute shadows the method until deleted
    try:
        yield calls
    finally:
        handle.remove()
        del fuser.delta


def dynamic_weight_table(calls: list[tuple[torch.Tensor, torch.Tensor]], fuser: C2CFuser) -> list[dict]:
    """Per receiver layer: mean dynamic weight of K and of V over the fused positions and heads of every
    recorded call, and whether that layer's K / V gate is open."""
    if not calls:
        raise ValueError("no fusion was recorded: run the fused model inside record_dynamic_weights")
    sums = torch.zeros(calls[0][0].shape[0], dtype=torch.float64)
    count = 0
    for alpha, mask in calls:
        sums += (alpha.double() * mask[None, :, :, None]).sum(dim=(1, 2, 3))
        count += int(mask.sum()) * alpha.shape[-1]
    if count == 0:
        raise ValueError("the recorded fusions fused no position")
    means = (sums / count).view(-1, 2)  # (L, 2)
    gates = gate_table(fuser)
    return [{"layer": t, "key_weight": float(means[t, 0]), "value_weight": float(means[t, 1]),
             "key_open": gates[t]["key_open"], "value_open": gates[t]["value_open"]} for t in range(means.shape[0])]
