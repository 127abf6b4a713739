"""What a benchmark result was measured with: every benchmark's JSON carries it,
so the README can cite the runs it quotes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

__all__ = ["run_info"]


def run_info() -> dict:
    """What a result was measured with: commit, versions, CPUs."""
    import importlib.metadata

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            timeout=10,
        ).stdout.strip()
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
