"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_sha() -> str | None:
    """HEAD of the checkout, or INFINITY_GIT_SHA where the tree was copied without .git."""
    if os.environ.get("INFINITY_GIT_SHA"):
        return os.environ["INFINITY_GIT_SHA"]
    try:
        return subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
