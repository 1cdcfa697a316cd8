"""Statistics for comparing methods on the same items: intervals, paired tests, gap recovered.

Every comparison in the tables is *paired*: two methods answered the same items, so what matters is
the items on which they disagree. Plain Python (exact binomial sums with integers), no SciPy.

* ``wilson_interval(k, n)``: 95% interval of an accuracy (Wilson score; well behaved near 0 and 1).
* ``mean_interval(scores)``: 95% interval of a mean score in [0, 1] (normal approximation, clipped to [0, 1]).
* ``paired_comparison(a, b)``: difference of two methods' mean scores on the same items (correctness,
  or scores in [0, 1] such as LongBench's F1), its 95% interval (Wald on the per-item differences), the
  counts of items each scores higher on and the exact two-sided binomial test on those items: McNemar's
  test for correctness, the sign test for scores.
* ``paired_by_id(records_a, records_b)``: the same on the items both per-item record lists hold (by ``id``).
* ``pgr(method, weak, strong)``: performance gap recovered, (method - weak) / (strong - weak), the
  paper's PGR with the receiver as the weak and the sharer as the strong model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion correct / n (as fractions)."""
    if n <= 0:
        raise ValueError(f"an interval needs at least one item, got n={n}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, n={n}], got {correct}")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(scores: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """The normal-approximation interval of the mean of ``scores`` in [0, 1] (mean +- z x sample sd / sqrt(n)),
    clipped to [0, 1]."""
    n = len(scores)
    if n == 0:
        raise ValueError("an interval needs at least one item")
    mean = sum(scores) / n
    half = z * math.sqrt(sum((x - mean) ** 2 for x in scores) / (n - 1) / n) if n > 1 else 0.0
    return max(0.0, mean - half), min(1.0, mean + half)


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips: P(X <= min) + P(X >= max), capped at 1."""
    if n == 0:
        return 1.0
    low = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(low + 1))
    return min(1.0, 2 * tail / 2**n)


@dataclass(frozen=True)
class PairedComparison:
    """Method a against method b on the same n items."""

    n: int
    accuracy_a: float  # a's mean score (its accuracy, for correctness)
    accuracy_b: float
    difference: float  # accuracy_a - accuracy_b
    interval: tuple[float, float]  # 95% interval of the difference
    a_only: int  # items a scores higher on (answers correctly and b does not)
    b_only: int
    p_value: float  # exact McNemar / sign test (two-sided)

    def to_dict(self) -> dict:
        return asdict(self)

    def columns(self, name: str) -> dict:
        """Table columns: the difference in percentage points as ``name``, its interval (``name``_low/_high) and
        p-value (``name``_p)."""
        return {name: 100 * self.difference, f"{name}_low": 100 * self.interval[0],
                f"{name}_high": 100 * self.interval[1], f"{name}_p": self.p_value}


def paired_comparison(a: Sequence[bool | float], b: Sequence[bool | float], z: float = Z95) -> PairedComparison:
    """Compare per-item correctness (or scores in [0, 1]) of two methods on the same items (same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same items: {len(a)} vs {len(b)} results")
    n = len(a)
    if n == 0:
        raise ValueError("paired comparison of zero items")
    differences = [float(x) - float(y) for x, y in zip(a, b)]  # in {-1, 0, 1} for correctness
    a_only = sum(d > 0 for d in differences)
    b_only = sum(d < 0 for d in differences)
    difference = sum(differences) / n
    variance = (sum(d * d for d in differences) / n - difference**2) / n
    half = z * math.sqrt(max(variance, 0.0))
    return PairedComparison(n, sum(map(float, a)) / n, sum(map(float, b)) / n, difference,
                            (difference - half, difference + half), a_only, b_only,
                            binomial_two_sided_p(a_only, a_only + b_only))


def paired_by_id(records_a: Sequence[dict], records_b: Sequence[dict],
                 field: str = "correct") -> PairedComparison | None:
    """``paired_comparison`` of two methods' per-item records (``{"id", field, ...}``, ``field`` their correctness
    or score) on the items both hold, in a's order; None when they share no item (e.g. runs on different subsets)."""
    score_b = {r["id"]: r[field] for r in records_b}
    common = [r for r in records_a if r["id"] in score_b]
    if not common:
        return None
    return paired_comparison([r[field] for r in common], [score_b[r["id"]] for r in common])


def pgr(method: float, weak: float, strong: float) -> float | None:
    """Performance gap recovered: (method - weak) / (strong - weak); None when the strong model is not above the weak
    one (no gap to recover: the ratio of two differences below zero would read as a recovery)."""
    if strong <= weak:
        return None
    return (method - weak) / (strong - weak)
