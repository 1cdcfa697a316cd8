"""One figure style for every notebook; figures saved as PNG and PDF under figures/<profile>/; Venn and radar charts."""

from __future__ import annotations

from pathlib import Path

# No backend is forced here: a notebook (JupyterLab, papermill, nbval) uses the inline backend, so its figures
# show in the notebook and in the executed copies; elsewhere matplotlib picks one (Agg without a display).
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.patches import Circle

from c2c.paths import REPO_ROOT


# the four systems of the paper: a short name and one colour each, the same in every figure
METHODS = {"receiver": ("Receiver", "#8c8c8c"), "sharer": ("Sharer", "#4c72b0"), "t2t": ("T2T", "#55a868"),
           "c2c": ("C2C", "#dd8452")}
# rows of a main table derived from the methods' records (c2c.routing), not methods one runs
TABLE_ROWS = {**METHODS, "routing": ("Routing", "#8172b3")}


def style() -> None:
    """The project style (seaborn whitegrid, paper context, legends without frames); figure() applies it."""
    sns.set_theme(style="whitegrid", context="paper", font_scale=1.1,
                  rc={"axes.titlesize": 10, "legend.fontsize": 8, "legend.frameon": False, "figure.dpi": 110})


def figure(width: float = 6.0, height: float = 3.6, **subplot_kwargs):
    """A new figure in the project style: (fig, ax) or (fig, axes)."""
    style()
    return plt.subplots(figsize=(width, height), constrained_layout=True, **subplot_kwargs)


def method_labels(methods: list[dict]) -> list[str]:
    """Short legend labels of evaluation method entries ({name, key}): "C2C"; where several entries share a name,
    the rest of each key tells them apart ("C2C generate", "C2C logits", "C2C identical lr5e-4")."""
    names = [m["name"] for m in methods]
    labels = []
    for m in methods:
        short = TABLE_ROWS[m["name"]][0] if m["name"] in TABLE_ROWS else m["name"]
        rest = m["key"].removeprefix(m["name"]).strip("_").replace("_", " ")
        labels.append(f"{short} {rest}" if names.count(m["name"]) > 1 and rest else short)
    if len(set(labels)) != len(labels):
        raise ValueError(f"method keys {[m['key'] for m in methods]} give duplicate labels {labels}")
    return labels


def method_colours(methods: list[dict]) -> list:
    """A colour per evaluation method entry: the first of each name its name's colour (METHODS), every further
    entry of a name (another fuser, another scoring) its own colour from the palette."""
    spare = iter(sns.color_palette("colorblind", 10)[4:] + sns.color_palette("dark", 10))
    colours, seen = [], set()
    for m in methods:
        first = m["name"] in TABLE_ROWS and m["name"] not in seen
        colours.append(TABLE_ROWS[m["name"]][1] if first else next(spare))
        seen.add(m["name"])
    return colours


def grouped_bars(ax, groups: list[str], series: dict[str, tuple[list, list, list]], colours: list | None = None):
    """Bars per group (x) and series (hue), each with its interval as an error bar: series maps a label to
    (values, lows, highs), None where there is no value or no interval."""
    width = 0.8 / len(series)
    colours = colours or sns.color_palette(n_colors=len(series))
    for i, ((label, (values, lows, highs)), colour) in enumerate(zip(series.items(), colours)):
        x = np.arange(len(groups)) - 0.4 + width * (i + 0.5)
        y = np.array([np.nan if v is None else v for v in values], dtype=float)
        err = np.array([[np.nan if v is None or lo is None else v - lo for v, lo in zip(values, lows)],
                        [np.nan if v is None or hi is None else hi - v for v, hi in zip(values, highs)]])
        ax.bar(x, y, width=width, color=colour, label=label, yerr=None if np.isnan(err).all() else err, capsize=2,
               error_kw={"elinewidth": 0.8, "ecolor": "0.2"})
    ax.set_xticks(np.arange(len(groups)), groups)


def interval_bars(ax, labels: list[str], values: list[float], lows: list[float], highs: list[float], colours: list,
                  horizontal: bool = False) -> None:
    """One bar per label with its interval [low, high] as an error bar (bars along x, or along y if horizontal)."""
    values = np.asarray(values, dtype=float)
    err = [values - np.asarray(lows, dtype=float), np.asarray(highs, dtype=float) - values]
    if horizontal:
        ax.barh(labels, values, xerr=err, color=colours, capsize=3)
    else:
        ax.bar(labels, values, yerr=err, color=colours, capsize=3)


def legend_outside(ax, **kwargs) -> None:
    """The legend right of the axes, where it cannot cover a bar or a point."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), **kwargs)


def chance(ax, value: float, label: str = "chance", horizontal: bool = True) -> None:
    """A dashed reference line at `value` (accuracy of guessing), in the legend as `label`."""
    (ax.axhline if horizontal else ax.axvline)(value, color="0.25", ls="--", lw=1, label=label, zorder=0.5)


def logit_limit(logits) -> float:
    """The half-width of a symmetric colour scale for gate logits: max(1, max |logit|), so that logits near 0
    (a gate on the fence) stay pale instead of filling the scale."""
    return max(1.0, float(np.abs(np.asarray(logits, dtype=float)).max(initial=0.0)))


def save(fig, name: str, profile: str, caption: str, folder: Path | None = None) -> list[Path]:
    """Save `fig` as figures/<profile>/<name>.png and .pdf, with the profile in its caption line."""
    folder = folder or REPO_ROOT / "figures" / profile
    folder.mkdir(parents=True, exist_ok=True)
    fig.text(0.0, -0.02, f"{caption} [profile: {profile}]", ha="left", va="top", fontsize=8, color="0.35",
             transform=fig.transFigure)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return paths


# label positions of the 7 regions of three unit circles centred at (-0.55, 0.35), (0.55, 0.35), (0, -0.6)
_VENN_CENTRES = ((-0.55, 0.35), (0.55, 0.35), (0.0, -0.6))
_VENN_LABELS = {(True, False, False): (-1.0, 0.6), (False, True, False): (1.0, 0.6), (False, False, True): (0.0, -1.15),
                (True, True, False): (0.0, 0.75), (True, False, True): (-0.6, -0.4), (False, True, True): (0.6, -0.4),
                (True, True, True): (0.0, 0.05)}


def venn3(ax, counts: dict[tuple[bool, bool, bool], int], names: tuple[str, str, str], none: int | None = None) -> None:
    """Three overlapping circles with a count in each of the 7 regions (counts keyed by membership flags)."""
    colours = sns.color_palette(n_colors=3)
    for (x, y), colour in zip(_VENN_CENTRES, colours):
        ax.add_patch(Circle((x, y), 1.0, facecolor=(*colour, 0.25), edgecolor=colour, lw=1.5))
    for (x, y), name, colour, (dx, dy) in zip(_VENN_CENTRES, names, colours, ((-0.6, 0.75), (0.6, 0.75), (0, -1.05))):
        ax.text(x + dx, y + dy, name, ha="center", va="center", color=colour, fontsize=10, weight="bold")
    for flags, (x, y) in _VENN_LABELS.items():
        ax.text(x, y, f"{counts[flags]:,}", ha="center", va="center", fontsize=10)
    if none is not None:
        ax.text(1.55, -1.55, f"none: {none:,}", ha="right", va="bottom", fontsize=9, color="0.35")
    ax.set(xlim=(-1.75, 1.75), ylim=(-1.75, 1.55), aspect="equal")
    ax.axis("off")


def radar(ax, labels: list[str], series: dict[str, list[float]]) -> None:
    """A radar chart on a polar ``ax``: one closed polygon per series over the spokes ``labels``."""
    angles = np.linspace(0, 2 * np.pi, len(labels), endpoint=False).tolist()
    for name, values in series.items():
        if len(values) != len(labels):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(labels)} spokes")
        ax.plot(angles + angles[:1], list(values) + list(values[:1]), marker="o", ms=3, label=name)
        ax.fill(angles + angles[:1], list(values) + list(values[:1]), alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels(labels, fontsize=8)
