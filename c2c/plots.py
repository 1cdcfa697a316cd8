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


def figure(width: float = 6.0, height: float = 3.6, **subplot_kwargs):
    """A new figure in the project style: (fig, ax) or (fig, axes)."""
    sns.set_theme(style="whitegrid", context="paper", font_scale=1.1)
    return plt.subplots(figsize=(width, height), constrained_layout=True, **subplot_kwargs)


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
