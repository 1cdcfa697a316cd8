"""MMLU accuracy per subcategory: the paper's Figure 8 (radar) and Figures 9-10 (gain over the receiver).

``SUBCATEGORY`` is MMLU's standard subject -> subcategory map (57 subjects, 17 subcategories, from the
benchmark's own release, hendrycks/test ``categories.py``); MMLU-Redux keeps MMLU's subjects. The
accuracy of a method in a subcategory is over the items of its subjects that the method answered; a
gain over the receiver is computed on the items both answered (paired), so a method run on a subset
(e.g. T2T) is compared on that subset.
"""

from __future__ import annotations

from collections import defaultdict

SUBCATEGORY = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics", "business_ethics": "business",
    "clinical_knowledge": "health", "college_biology": "biology", "college_chemistry": "chemistry",
    "college_computer_science": "computer science", "college_mathematics": "math", "college_medicine": "health",
    "college_physics": "physics", "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering", "elementary_mathematics": "math",
    "formal_logic": "philosophy", "global_facts": "other", "high_school_biology": "biology",
    "high_school_chemistry": "chemistry", "high_school_computer_science": "computer science",
    "high_school_european_history": "history", "high_school_geography": "geography",
    "high_school_government_and_politics": "politics", "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math", "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math", "high_school_us_history": "history",
    "high_school_world_history": "history", "human_aging": "health", "human_sexuality": "culture",
    "international_law": "law", "jurisprudence": "law", "logical_fallacies": "philosophy",
    "machine_learning": "computer science", "management": "business", "marketing": "business",
    "medical_genetics": "health", "miscellaneous": "other", "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy", "nutrition": "health", "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law", "professional_medicine": "health",
    "professional_psychology": "psychology", "public_relations": "politics", "security_studies": "politics",
    "sociology": "culture", "us_foreign_policy": "politics", "virology": "health", "world_religions": "philosophy",
}  # fmt: skip

# the order of the x-axis of the paper's Figures 9 and 10
SUBCATEGORIES = ("math", "computer science", "physics", "biology", "chemistry", "engineering", "culture",
                 "psychology", "politics", "economics", "geography", "philosophy", "history", "law", "health",
                 "other", "business")


def subcategory_of(subject: str) -> str:
    """The subcategory of an MMLU subject (a ValueError names an unknown one)."""
    try:
        return SUBCATEGORY[subject]
    except KeyError:
        raise ValueError(f"{subject!r} is not one of MMLU's 57 subjects: per-subcategory results need MMLU or "
                         "MMLU-Redux records") from None


def subcategory_accuracy(records: dict[str, list[dict]]) -> list[dict]:
    """Figure 8's data: per subcategory (paper order) and method, accuracy (0-1) and item count.

    records: method name -> its per-item records (``c2c.records.method_records``). Subcategories without
    items in any method's records are left out.
    """
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for method, rows in records.items():
        for r in rows:
            count = counts[(method, subcategory_of(r["subject"]))]
            count[0] += bool(r["correct"])
            count[1] += 1
    out = []
    for sub in SUBCATEGORIES:
        for method in records:
            correct, n = counts.get((method, sub), (0, 0))
            if n:
                out.append({"subcategory": sub, "method": method, "accuracy": correct / n, "n": n})
    return out


def subcategory_gain(records: dict[str, list[dict]], baseline: str = "receiver") -> list[dict]:
    """Figures 9-10: per subcategory and method (not the baseline), accuracy minus the baseline's on the items
    both answered (points of accuracy, 0-1 scale), with that item count."""
    if baseline not in records:
        raise ValueError(f"the baseline {baseline!r} has no records; methods: {list(records)}")
    base = {r["id"]: bool(r["correct"]) for r in records[baseline]}
    out = []
    for sub in SUBCATEGORIES:
        for method, rows in records.items():
            if method == baseline:
                continue
            paired = [(bool(r["correct"]), base[r["id"]]) for r in rows
                      if r["id"] in base and subcategory_of(r["subject"]) == sub]
            if paired:
                out.append({"subcategory": sub, "method": method,
                            "gain": sum(a - b for a, b in paired) / len(paired), "n": len(paired)})
    return out
