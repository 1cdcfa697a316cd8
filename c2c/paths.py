"""Where the project keeps files that are not in git (built tiny models, downloaded offline models and data),
and how configs name the repository's own files."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """The cache folder: $C2C_CACHE if set, else ~/.cache/c2c. Created on first use."""
    path = Path(os.environ.get("C2C_CACHE", Path.home() / ".cache" / "c2c"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def repo_path(path: str | os.PathLike) -> Path:
    """A path a config names, on disk. Configs are written for the repository (``runs/small/mc_fuser/final``,
    ``results/small/mc``), so a relative path is relative to the repository root, whatever the working
    folder (papermill runs notebooks in ``notebooks/``); ``~`` is expanded, absolute paths stay."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def repo_relative(path: str | os.PathLike) -> str:
    """How configs and provenance record a path: relative to the repository root when it lies inside it (the
    same string on every machine and from every working folder), else absolute."""
    resolved = repo_path(path).resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(resolved)


def not_run_note(profile: str, notebook: str, root: str | os.PathLike = REPO_ROOT) -> Path:
    """Where a notebook records why a profile does not run it: ``results/<profile>/not_run/<notebook>.txt``. The
    reproduction index shows the reason, and the Makefile's product check accepts a notebook that wrote one."""
    return Path(root) / "results" / profile / "not_run" / f"{notebook}.txt"


def record_not_run(profile: str, notebook: str, reason: str | None, root: str | os.PathLike = REPO_ROOT) -> bool:
    """Write the reason a profile does not run a notebook, or remove an earlier one when there is none (reason
    None or empty); True when the notebook runs."""
    note = not_run_note(profile, notebook, root)
    if reason:
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_text(reason.strip() + "\n", encoding="utf-8")
        return False
    note.unlink(missing_ok=True)
    return True
