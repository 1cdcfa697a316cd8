"""Fuse only part of the prompt (the paper's Figure 11, "progressive behaviour", A.2.4).

At evaluation only, a fraction p of the positions C2C would fuse keep their fused cache and the rest
keep the receiver's own: from the front ("former": the first round(p * m) of a prompt's m fused
positions) or from the back ("latter": the last ones). p = 0 is the receiver alone, p = 1 full C2C.
The fuser is the one trained with full fusion. Implemented as a ``fuse_mask`` restriction
(``partial_fuse_mask``) in a C2C method (``PartialC2C``), so it runs on the shared engine, and its
per-item records are cached by ``c2c.evaluate.evaluate`` like every method's.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from c2c.fingerprint import code_version
from c2c.fused import FusedInputs
from c2c.methods import C2C

SIDES = ("former", "latter")


def partial_fuse_mask(fuse_mask: torch.Tensor, attention_mask: torch.Tensor, fraction: float, side: str) -> torch.Tensor:
    """The (B, N) fuse mask restricted to a fraction of each row's fusable positions, from the front or the back.

    Fusable: fuse_mask & attention_mask, over every position but the last (which is never fused).
    Each row keeps k = floor(fraction * m + 1/2) of its m fusable positions: the first k ("former") or
    the last k ("latter").
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    fusable = fuse_mask.bool() & attention_mask.bool()
    fusable[:, -1] = False
    m = fusable.sum(dim=1, keepdim=True)  # (B, 1)
    k = torch.floor(fraction * m.double() + 0.5).long()  # (B, 1)
    rank = fusable.long().cumsum(dim=1)  # (B, N): 1..m at the fusable positions
    keep = rank <= k if side == "former" else rank > m - k
    return fusable & keep


class PartialC2C(C2C):
    """C2C fusing only a ``fraction`` of the prompt positions, from the ``side`` given (module docstring)."""

    def __init__(self, model, *, fraction: float, side: str, **options):
        partial_fuse_mask(torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2), fraction, side)  # checks the values
        self.fraction, self.side = fraction, side
        super().__init__(model, **options)

    @classmethod
    def of(cls, method: C2C, fraction: float, side: str) -> "PartialC2C":
        """The same model, fuser and options as a C2C method, fusing only part of the prompt."""
        return cls(method.model, fraction=fraction, side=side, scoring=method.scoring,
                   max_new_tokens=method.max_new_tokens, assistant_prefix=method.assistant_prefix,
                   static_cache=method.static_cache, fuser_name=method.fuser_name,
                   receiver_name=method.receiver_name, sharer_names=method.sharer_names,
                   label=f"C2C, {fraction:.0%} fused ({side})")

    def describe(self) -> dict:
        return {**super().describe(), "fuse_fraction": self.fraction, "fuse_side": self.side}

    def fingerprints(self) -> dict:
        return {**super().fingerprints(), "partial_code": code_version(__name__)}

    def prepare(self, chats: list[list[dict]], assistant_prefix: str = "") -> FusedInputs:
        inputs = super().prepare(chats, assistant_prefix)
        sharers = [replace(s, fuse_mask=partial_fuse_mask(s.fuse_mask, inputs.attention_mask, self.fraction, self.side))
                   for s in inputs.sharers]
        return FusedInputs(inputs.input_ids, inputs.attention_mask, sharers)
