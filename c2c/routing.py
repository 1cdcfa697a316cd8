"""Table 4's Routing baseline: each query answered by the receiver or the sharer alone, half each, by rank.

The paper (``paper-v2.md`` 1.5) ranks the queries by RouteLLM's matrix-factorisation router (OpenAI
``text-embedding-3-small`` query embeddings, the router's vectors of two other models), calls the pair's
model with the higher standalone accuracy on the benchmark "strong", sends the upper half of the ranking
(the queries where the strong model is likeliest to win) to it and the lower half to the weak one, and
reports the time of whichever model answered. Neither the embedding API nor the router's weights are
reachable offline, so this module is a stand-in on a local signal: the **receiver's confidence**, its
probability of its own answer among the letters (a softmax of its letter scores, ``scoring: logits``).
A query the receiver is unsure of is likelier to be won by the sharer: the least confident half goes to
the sharer when the sharer is the strong model, the most confident half to the receiver when the receiver
is. The router reads the receiver's answer, so every query pays the receiver's time and the sharer's
queries the sharer's too (a cascade): the time column says so, unlike the paper's router which answers
with one model only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

ROUTING_KEY = "routing"  # the derived routing baseline's method key in a main table and in comparisons
ROUTING_LABEL = "Routing (stand-in: receiver confidence, 50/50)"


def receiver_confidence(record: dict) -> float:
    """The probability the receiver gives its own answer among the answer letters: softmax of the letter scores."""
    scores = record.get("scores")
    if not scores:
        raise ValueError(f"item {record['id']!r}: the routing stand-in needs the receiver's letter scores (evaluate "
                         "the receiver with scoring: logits); this record has none"
                         + (f" (it raised: {record['error']})" if record.get("error") else ""))
    top = max(scores.values())
    return 1.0 / sum(math.exp(score - top) for score in scores.values())


def route(receiver_records: Sequence[dict], sharer_records: Sequence[dict], strong_share: float = 0.5) -> list[dict]:
    """Records of the routing baseline on the receiver's items, in its order: each is the record of the model the
    query went to, with ``routed_to``, the receiver's ``confidence`` and ``seconds`` as the cascade spends them.

    strong_share: the fraction of queries sent to the strong model (the paper: 0.5), rounded to whole items.
    """
    if not 0.0 <= strong_share <= 1.0:
        raise ValueError(f"strong_share must be in [0, 1], got {strong_share}")
    sharer_by_id = {r["id"]: r for r in sharer_records}
    missing = [r["id"] for r in receiver_records if r["id"] not in sharer_by_id]
    if missing:
        raise ValueError(f"routing needs both models' answers to every item: the sharer has no record of {len(missing)} "
                         f"items, e.g. {missing[:3]}; finish the sharer's evaluation first")
    # strong: the higher standalone accuracy on these items (a tie keeps the receiver)
    sharer_correct = sum(bool(sharer_by_id[r["id"]]["correct"]) for r in receiver_records)
    strong = "sharer" if sharer_correct > sum(bool(r["correct"]) for r in receiver_records) else "receiver"
    confidence = {r["id"]: receiver_confidence(r) for r in receiver_records}
    # likeliest wins of the strong model first: the receiver's least confident queries when the sharer is strong
    ranked = sorted(confidence, key=confidence.get, reverse=strong == "receiver")
    to_strong = set(ranked[:round(strong_share * len(ranked))])
    routed = []
    for record in receiver_records:
        goes_strong = record["id"] in to_strong
        to = strong if goes_strong else ("receiver" if strong == "sharer" else "sharer")
        chosen = sharer_by_id[record["id"]] if to == "sharer" else record
        seconds = record["seconds"] + (chosen["seconds"] if to == "sharer" else 0.0)
        routed.append({**chosen, "routed_to": to, "confidence": confidence[record["id"]], "seconds": seconds})
    return routed
