"""Provenance of a run: git commit and branch, package versions, host."""

from __future__ import annotations

import os
import socket
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("apqa", "numpy", "scipy", "astropy", "galsim", "pandas", "sep", "sqlalchemy",
            "lsst-sdm-schemas", "lsst-alert-packet")
# Branch names CI systems put in the environment (checked in order before asking git).
_BRANCH_VARS = ("APQA_GIT_BRANCH", "GITHUB_HEAD_REF", "GITHUB_REF_NAME", "CI_COMMIT_BRANCH",
                "BRANCH_NAME", "GIT_BRANCH")


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                                timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def git_info(cwd: str | os.PathLike | None = None) -> tuple[str | None, str | None]:
    """(commit sha, branch) of the checkout at ``cwd`` (default: this package's source)."""
    where = Path(cwd) if cwd is not None else Path(__file__).resolve().parents[2]
    sha = os.environ.get("APQA_GIT_SHA") or _git(["rev-parse", "HEAD"], where)
    branch = next((os.environ[v] for v in _BRANCH_VARS if os.environ.get(v)), None)
    if branch is None:
        branch = _git(["rev-parse", "--abbrev-ref", "HEAD"], where)
        branch = None if branch == "HEAD" else branch
    return sha, branch


def installed_versions() -> dict[str, str]:
    """Installed versions of the packages that shape apqa's numbers."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def host_name() -> str:
    return socket.gethostname()
