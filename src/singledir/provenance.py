"""Versions, hardware and code version, saved with every result and printed by
``singledir env`` for bug reports."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

_PACKAGES = (
    "singledir",
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "scipy",
    "scikit-learn",
    "matplotlib",
    "mlxtend",
)


def derive_seed(seed: int, *keys: int) -> int:
    """Derive an independent 31-bit seed from a base seed and integer keys."""
    state = np.random.SeedSequence(
        [int(seed), *[int(key) for key in keys]]
    ).generate_state(1)
    return int(state[0] & 0x7FFFFFFF)


def package_versions() -> dict[str, str | None]:
    """Return the installed version of each relevant package, or None if missing."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(source: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(source), *args],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_state() -> dict[str, Any] | None:
    """Return the commit and dirty flag of the singledir checkout, or None.

    Only a checkout whose ``src/singledir`` is this very package counts, so an
    installed copy inside some other repository records nothing.
    """
    package = Path(__file__).resolve().parent
    top = _git(package, "rev-parse", "--show-toplevel")
    if not top or (Path(top) / "src" / "singledir").resolve() != package:
        return None
    status = _git(package, "status", "--porcelain", "--untracked-files=no")
    return {"commit": _git(package, "rev-parse", "HEAD"), "dirty": bool(status)}


def environment_info() -> dict[str, Any]:
    """Return Python, package versions, hardware and the singledir commit."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": cuda,
        "cuda_devices": [
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        ]
        if cuda
        else [],
        "torch_cuda_build": torch.version.cuda,
        "packages": package_versions(),
        "git": git_state(),
    }
