"""One figure style for every notebook; figures saved as PNG and PDF under figures/<profile>/."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: papermill, CI and servers; JupyterLab still shows figures inline

import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from c2c.paths import REPO_ROOT  # noqa: E402


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
