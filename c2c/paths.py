"""Where the project keeps files that are not in git: built tiny models, downloaded offline models and data."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """The cache folder: $C2C_CACHE if set, else ~/.cache/c2c. Created on first use."""
    path = Path(os.environ.get("C2C_CACHE", Path.home() / ".cache" / "c2c"))
    path.mkdir(parents=True, exist_ok=True)
    return path
