"""Where a run's figures come from, for its ``run.json``: read when the run starts (a commit made
while it runs is not the code that produced it)."""

from __future__ import annotations

import subprocess


def checkout() -> dict:
    """The commit checked out and whether tracked files differed from it; both None outside a git
    checkout (an installed package)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "uncommitted_changes": None}
    return {"commit": commit.strip(), "uncommitted_changes": bool(changed.strip())}
