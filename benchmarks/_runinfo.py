"""What a benchmark result was measured with: every benchmark's JSON carries it,
so the README can cite the runs it quotes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

__all__ = ["run_info"]


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10
    ).stdout.strip()


def run_info() -> dict:
    """What a result was measured with: commit, versions, CPUs."""
    import importlib.metadata

    try:
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except OSError:
        commit, dirty = "", ""
    try:
        ray_version = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        ray_version = None
    return {
        "commit": commit + ("+dirty" if dirty else ""),
        "python": sys.version.split()[0],
        "ray": ray_version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
