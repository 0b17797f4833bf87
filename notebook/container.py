"""One container run: overlay root, runc bundle, ``runc run``, and cleanup.

State for a container lives in ``<state_dir>/<id>/``: ``config.json`` (the
bundle), ``upper/`` and ``work/`` (the overlay's writable side) and
``rootfs/`` (the overlay mount). All of it is removed when the run ends,
whatever the outcome.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from lazyfs.errors import LazyfsError

from .imageuser import resolve_user
from .overlay import OverlayRoot
from .runtime_spec import merge_env, runtime_spec

log = logging.getLogger(__name__)


@dataclass
class ContainerRequest:
    image_dir: Path
    image_config: dict
    args: list[str]
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    terminal: bool = False


def command_args(request: ContainerRequest) -> list[str]:
    """Return the process arguments: the given command, else Entrypoint + Cmd."""
    config = request.image_config
    if request.args:
        return list(request.args)
    args = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
    if not args:
        raise LazyfsError("no command given and the image config has neither Entrypoint nor Cmd")
    return args


class Runc:
    """The runc binary with a lazyfs-owned state root, so our containers stay apart."""

    def __init__(self, binary: str = "runc", root: Path = Path("/run/lazyfs/runc")):
        self.binary = binary
        self.root = root

    def _base(self) -> list[str]:
        return [self.binary, "--root", str(self.root)]

    def run(self, bundle: Path, container_id: str) -> int:
        """Run the container in the foreground with our stdio; return its exit code."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # runc forwards SIGINT and SIGTERM to the container; this process waits
        # for runc so that cleanup always runs.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            try:
                process = subprocess.Popen(self._base() + ["run", "--bundle", str(bundle), container_id])
            except FileNotFoundError:
                raise LazyfsError(f"runc not found ({self.binary}): install the runc package") from None
            return process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def delete(self, container_id: str) -> None:
        result = subprocess.run(self._base() + ["delete", "--force", container_id],
                                capture_output=True, text=True)
        if result.returncode != 0 and "does not exist" not in result.stderr:
            log.warning("runc delete %s failed: %s", container_id, result.stderr.strip())


def run_container(request: ContainerRequest, state_dir: Path, runc: Runc | None = None) -> int:
    """Run one container over ``request.image_dir`` and return the command's exit code."""
    runc = runc or Runc()
    container_id = "lazyfs-" + secrets.token_hex(6)
    state = state_dir / container_id
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        with OverlayRoot(request.image_dir, state) as root:
            config = request.image_config
            user = resolve_user(root.rootfs, request.user if request.user is not None else config.get("User", ""))
            spec = runtime_spec(
                rootfs=root.rootfs,
                args=command_args(request),
                env=merge_env(config.get("Env") or [], request.env, user),
                cwd=request.workdir or config.get("WorkingDir") or "/",
                user=user,
                hostname=container_id,
                terminal=request.terminal,
            )
            (state / "config.json").write_text(json.dumps(spec, indent=1))
            log.debug("starting container %s over %s", container_id, request.image_dir)
            try:
                return runc.run(state, container_id)
            finally:
                runc.delete(container_id)
    finally:
        if os.path.ismount(state / "rootfs"):
            log.error("leaving %s in place: its overlay is still mounted", state)
        else:
            shutil.rmtree(state, ignore_errors=True)
