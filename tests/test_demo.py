"""The README's first command: scripts/demo indexes, mounts and runs python3 from the test image."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.containers import searchable_directory

pytestmark = [pytest.mark.image, pytest.mark.fuse, pytest.mark.runc]

REPO = Path(__file__).resolve().parent.parent


def test_demo_runs_cold_then_warm(debootstrap_image):
    with searchable_directory(prefix="lazyfs-demo-test-") as work:
        result = subprocess.run([str(REPO / "scripts" / "demo")], cwd=REPO, capture_output=True, text=True,
                                env=dict(os.environ, LAZYFS_DEMO_DIR=str(work / "demo")), timeout=600)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines.count("== cold run (empty RAM and disk tiers)") == 1
    assert lines.count("== warm run (chunks in the RAM tier, files in the page cache)") == 1
    python_lines = [line for line in lines if line.startswith("python 3.") and line.endswith(' from lazyfs: {"ok": true}')]
    assert len(python_lines) == 2
    assert "== daemon status" in lines
