"""Versions, hardware and code version, saved with every result and printed by
``singledir env`` for bug reports."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
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


# Linux reports the CPU model and the memory size here. Other systems lack the files.
_CPUINFO = Path("/proc/cpuinfo")
_MEMINFO = Path("/proc/meminfo")


def utc_now() -> str:
    """Return the current UTC time in ISO 8601 format, such as
    ``2025-01-31T12:00:00.123456+00:00``.
    """
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def _proc_field(path: Path, key: str) -> str | None:
    """Return the value of the first ``key: value`` line of a /proc file, or None."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, separator, value = line.partition(":")
        if separator and name.strip() == key:
            return value.strip()
    return None


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, else ``platform.processor()``,
    else ``platform.machine()``.

    The fallbacks may give only the architecture, such as "x86_64" or "arm".
    """
    return (
        _proc_field(_CPUINFO, "model name")
        or platform.processor()
        or platform.machine()
    )


def memory_total_bytes() -> int | None:
    """Return the total physical memory in bytes from /proc/meminfo, or None.

    Inside a container this is the host's memory, not the container's limit.
    """
    value = _proc_field(_MEMINFO, "MemTotal")
    if value is None:
        return None
    number, _, unit = value.partition(" ")
    # /proc/meminfo writes "kB" for units of 1,024 bytes.
    if not number.isdigit() or unit != "kB":
        return None
    return int(number) * 1024


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
    """Return Python, package versions, hardware, the singledir commit and the time.

    ``cpu_count`` counts logical CPUs. ``memory_total_bytes`` is None where
    /proc/meminfo cannot be read. ``time_utc`` is when this record was made.
    """
    import torch

    cuda = torch.cuda.is_available()
    return {
        "time_utc": utc_now(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": memory_total_bytes(),
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
