"""Which items each system answers correctly: the paper's Figure 7 (Venn diagrams of receiver, sharer, C2C).

``venn_counts`` counts the items in each of the 8 regions of three sets (7 Venn regions + answered by
none), over the items all three answered, and the paper's quoted statistic: of the items the sharer
gets right, the share C2C also gets right.
"""

from __future__ import annotations

from itertools import product

from c2c.records import correct_by_id


def region_name(members: tuple[str, ...]) -> str:
    """The region of the items answered correctly by exactly ``members``: "receiver only",
    "receiver & sharer only", "all three" or "none"."""
    if not members:
        return "none"
    if len(members) == 3:
        return "all three"
    return " & ".join(members) + " only"


def venn_counts(records: dict[str, list[dict]]) -> dict:
    """Region counts of three methods' correct sets (``records``: 3 method names -> per-item records, in order
    receiver, sharer, C2C). Returns {"names", "items", "regions": {region: count} (8, summing to items),
    "membership": {region: (bool, bool, bool)}, "sharer_correct_also_c2c": share or None}."""
    if len(records) != 3:
        raise ValueError(f"a three-set Venn diagram needs 3 methods, got {list(records)}")
    names = tuple(records)
    correct = [correct_by_id(rows) for rows in records.values()]
    items = set(correct[0]).intersection(*correct[1:])
    if not items:
        raise ValueError(f"{names} have no item in common")
    regions, membership = {}, {}
    for flags in product((True, False), repeat=3):
        name = region_name(tuple(n for n, f in zip(names, flags) if f))
        membership[name] = flags
        regions[name] = sum(tuple(c[i] for c in correct) == flags for i in items)
    sharer_right = [i for i in items if correct[1][i]]
    return {"names": names, "items": len(items), "regions": regions, "membership": membership,
            "sharer_correct_also_c2c": (sum(correct[2][i] for i in sharer_right) / len(sharer_right)
                                        if sharer_right else None)}
