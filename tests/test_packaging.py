"""The wheel ships one top-level package, ``lazyfs``, and coexists with Jupyter Notebook.

The folders ``indexer/`` and ``notebook/`` are mapped to ``lazyfs.indexer`` and
``lazyfs.notebook``. A top-level ``notebook`` package in the wheel would overwrite
Jupyter Notebook's package, so these tests build the real wheel and install it
beside Jupyter's ``notebook`` in a fresh virtual environment.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from tests.support.images import cache_dir

REPO_ROOT = Path(__file__).resolve().parent.parent

# Prints where each module would be imported from, without running the
# lazyfs sub-packages' own code.
_ORIGINS_SCRIPT = """
import importlib.util, json
names = ["notebook", "notebook.app", "lazyfs.notebook", "lazyfs.indexer"]
origins = {}
for name in names:
    spec = importlib.util.find_spec(name)
    origins[name] = spec.origin if spec else None
print(json.dumps(origins))
"""


def _run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    """Run ``command`` and fail the test with its output if it exits non-zero."""
    result = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, **kwargs
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, command))} failed with exit code {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result


def _copy_source_tree(dest: Path) -> None:
    """Copy the files git would commit (tracked or new, not ignored) to ``dest``.

    Building from a copy keeps setuptools' build/ and *.egg-info out of the
    work tree, and stale build/ output out of the wheel.
    """
    listing = _run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
    ).stdout
    for relative in filter(None, listing.split("\0")):
        source = REPO_ROOT / relative
        if not source.is_file():
            continue  # deleted in the work tree but still in the index
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    _copy_source_tree(source)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(work / "dist"), str(source)])
    (wheel,) = (work / "dist").glob("lazyfs-*.whl")
    return wheel


def _jupyter_wheelhouse() -> Path:
    """Return a directory of wheels for Jupyter Notebook and its dependencies.

    The wheelhouse is filled from the package index once per machine and cached
    under the test cache directory. It is filled in a temporary directory under a
    lock and renamed into place, so a half-filled wheelhouse is never used.
    """
    parent = cache_dir() / "wheelhouse"
    parent.mkdir(parents=True, exist_ok=True)
    wheelhouse = parent / "jupyter-notebook"
    with open(parent / ".jupyter-notebook.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if not wheelhouse.is_dir():
            filling = Path(tempfile.mkdtemp(prefix=".filling-", dir=parent))
            try:
                _run([sys.executable, "-m", "pip", "wheel", "-w", str(filling), "notebook>=7"])
                filling.rename(wheelhouse)
            finally:
                shutil.rmtree(filling, ignore_errors=True)
    return wheelhouse


def test_wheel_contains_only_lazyfs_package(built_wheel: Path) -> None:
    with zipfile.ZipFile(built_wheel) as wheel:
        names = wheel.namelist()
        dist_info = next(name.split("/")[0] for name in names if ".dist-info/" in name)
        top_level = wheel.read(f"{dist_info}/top_level.txt").decode().split()
    top_level_dirs = {name.split("/")[0] for name in names}

    assert top_level_dirs == {"lazyfs", dist_info}
    assert "notebook" not in top_level_dirs
    assert "indexer" not in top_level_dirs
    assert top_level == ["lazyfs"]
    assert "lazyfs/__init__.py" in names
    assert "lazyfs/indexer/__init__.py" in names
    assert "lazyfs/notebook/__init__.py" in names


def test_wheel_installs_beside_jupyter_notebook(built_wheel: Path, tmp_path: Path) -> None:
    wheelhouse = _jupyter_wheelhouse()
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse),
          "notebook>=7"])
    # Only the package layout is under test, so the runtime dependencies
    # (pyfuse3 needs a compiler) are left out.
    _run([str(python), "-m", "pip", "install", "--no-deps", str(built_wheel)])

    # -I and a neutral working directory keep the repository's own
    # notebook/ folder off sys.path.
    output = _run([str(python), "-I", "-c", _ORIGINS_SCRIPT], cwd=tmp_path).stdout
    origins = json.loads(output)
    site_packages = Path(
        _run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
             cwd=tmp_path).stdout.strip()
    )

    assert origins["notebook"] == str(site_packages / "notebook" / "__init__.py")
    assert origins["notebook.app"] == str(site_packages / "notebook" / "app.py")
    assert origins["lazyfs.notebook"] == str(site_packages / "lazyfs" / "notebook" / "__init__.py")
    assert origins["lazyfs.indexer"] == str(site_packages / "lazyfs" / "indexer" / "__init__.py")
    assert os.path.commonpath([origins["notebook"], str(venv)]) == str(venv)
