"""Describe the machine and the software versions behind a benchmark run."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


def describe_machine(work_dir: Path) -> list[tuple[str, str]]:
    """Return (label, value) pairs: hardware, kernel, tool versions and the lazyfs commit.

    ``work_dir`` is where the benchmark keeps its files. Its file system is
    listed because runs with a dropped page cache read from that disk.
    """
    return [
        ("CPU", cpu_model()),
        ("cores", str(os.cpu_count())),
        ("RAM", f"{memory_bytes() / (1 << 30):.1f} GiB"),
        ("kernel", platform.release()),
        ("work directory", f"{work_dir} ({filesystem_type(work_dir)})"),
        ("python", platform.python_version()),
        ("runc", tool_version(["runc", "--version"])),
        ("umoci", tool_version(["umoci", "--version"])),
        ("skopeo", tool_version(["skopeo", "--version"])),
        ("lazyfs commit", lazyfs_commit()),
    ]


def cpu_model() -> str:
    """Return the first ``model name`` in /proc/cpuinfo, or "unknown"."""
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    return "unknown"


def memory_bytes() -> int:
    """Return MemTotal from /proc/meminfo in bytes."""
    with open("/proc/meminfo", encoding="utf-8") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemTotal line")


def filesystem_type(path: Path) -> str:
    """Return the type of the file system that contains ``path`` (``df --output=fstype``)."""
    result = subprocess.run(["df", "--output=fstype", str(path)], capture_output=True, text=True)
    lines = result.stdout.split()
    return lines[-1] if result.returncode == 0 and len(lines) > 1 else "unknown"


def tool_version(command: list[str]) -> str:
    """Return the first line a ``--version`` command prints, or why there is none."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "not installed"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else f"no output (exit code {result.returncode})"


def lazyfs_commit() -> str:
    """Return the checked-out commit, marked when tracked files differ from it."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return "unknown (not a git checkout)"
    changes = _git("status", "--porcelain", "--untracked-files=no")
    return f"{commit} with uncommitted changes" if changes else commit


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(REPOSITORY_ROOT), *args],
                                capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None
