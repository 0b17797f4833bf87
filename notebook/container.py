"""One container run: overlay root, runc bundle, ``runc run``, and cleanup.

State for a container lives in ``<state_dir>/<id>/``: ``config.json`` (the
bundle), ``upper/`` and ``work/`` (the overlay's writable side) and
``rootfs/`` (the overlay mount). All of it is removed when the run ends,
whatever the outcome. With a user namespace (``ContainerRequest.id_range``),
``<id>/`` belongs to the container's root on the host and ``state_dir`` is
made searchable by others (mode 0711), because runc mounts ``rootfs/`` from
inside the namespace.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lazyfs.errors import LazyfsError

from .imageuser import resolve_user
from .overlay import OverlayRoot, unmount
from .runtime_spec import merge_env, runtime_spec
from .userns import IdRange, check_searchable

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@dataclass
class ContainerRequest:
    image_dir: Path
    image_config: dict
    args: list[str]
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    # Host ids of the container's user namespace; None runs it as host root.
    id_range: IdRange | None = None


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
    """The runc binary with a lazyfs-owned state root, so our containers stay apart.

    A container runs as ``runc create`` then ``runc start``, with this process
    as the child subreaper that waits for the container's init process. This
    separates a failure to set up the container (an error) from the command's
    own exit code, which ``runc run`` returns through the same channel.
    """

    def __init__(self, binary: str = "runc", root: Path = Path("/run/lazyfs/runc")):
        self.binary = binary
        self.root = root

    def _command(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.root), *args]

    def _check(self, action: str, *args: str) -> None:
        try:
            result = subprocess.run(self._command(*args), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        except FileNotFoundError:
            raise LazyfsError(f"runc not found ({self.binary}): install the runc package") from None
        if result.returncode != 0:
            raise LazyfsError(f"runc {action} failed (exit code {result.returncode}): "
                              f"{result.stderr.strip() or 'no message'}")

    def run(self, bundle: Path, container_id: str) -> int:
        """Run the container with this process's stdio; return the command's exit code.

        The exit code is 128 + N when the command was killed by signal N.
        SIGINT, SIGTERM and SIGHUP received meanwhile are forwarded to it.
        """
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        set_child_subreaper()
        pid_file = bundle / "init.pid"
        log_file = bundle / "runc.log"
        # The container inherits this process's stdio from "runc create", so
        # runc's own messages go to a log file instead of a pipe that the
        # container would hold open.
        try:
            process = subprocess.run([self.binary, "--root", str(self.root), "--log", str(log_file),
                                      "create", "--bundle", str(bundle), "--pid-file", str(pid_file),
                                      container_id])
        except FileNotFoundError:
            raise LazyfsError(f"runc not found ({self.binary}): install the runc package") from None
        if process.returncode != 0:
            raise ContainerStartError(_runc_error(log_file))
        pid = int(pid_file.read_text())
        forwarder = _SignalForwarder(pid)
        previous = {sig: signal.signal(sig, forwarder) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            self._check("start", "start", container_id)
            return _wait_exit_code(pid)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def delete(self, container_id: str) -> None:
        result = subprocess.run(self._command("delete", "--force", container_id),
                                capture_output=True, text=True)
        if result.returncode != 0 and "does not exist" not in result.stderr:
            log.warning("runc delete %s failed: %s", container_id, result.stderr.strip())


class ContainerStartError(LazyfsError):
    """runc could not start the command; ``exit_code`` follows Docker's conventions.

    127: the command was not found in the image; 126: it could not be executed
    (permission denied, not an executable); 125: any other setup failure.
    """

    def __init__(self, runc_message: str):
        super().__init__(f"the container did not start: {runc_message}")
        self.exit_code = 125
        if "exec: " in runc_message:
            if "executable file not found" in runc_message or "no such file or directory" in runc_message:
                self.exit_code = 127
            elif "permission denied" in runc_message or "exec format error" in runc_message:
                self.exit_code = 126


def _runc_error(log_file: Path) -> str:
    """Return the last error runc logged, without runc's prefix and quoting."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return "runc wrote no log"
    for line in reversed(lines):
        if "level=error" in line:
            message = line.partition("msg=")[2].strip()
            if message.startswith('"') and message.endswith('"'):
                message = message[1:-1].replace('\\"', '"')
            return message.removeprefix("runc create failed: ").removeprefix("unable to start container process: ")
    return lines[-1] if lines else "runc logged nothing"


def set_child_subreaper() -> None:
    """Make orphaned descendants (the container's init) children of this process."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise LazyfsError(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}")


class _SignalForwarder:
    """Forward the first signal to the container's process; kill it on the second.

    The command runs as PID 1 of its namespace, where the kernel drops signals
    it has no handler for, so a second Ctrl-C or SIGTERM must still end it.
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.received = 0

    def __call__(self, number: int, _frame) -> None:
        self.received += 1
        target = number if self.received == 1 else signal.SIGKILL
        if self.received == 1:
            print(f"lazyfs-run: forwarded {signal.Signals(number).name} to the container; "
                  "send another signal to kill it", file=sys.stderr, flush=True)
        elif self.received == 2:
            print("lazyfs-run: second signal: killing the container", file=sys.stderr, flush=True)
        try:
            os.kill(self.pid, target)
        except ProcessLookupError:
            pass


def _wait_exit_code(pid: int) -> int:
    """Reap children until ``pid`` exits; return its exit code (128 + signal if killed)."""
    while True:
        try:
            reaped, status = os.wait()
        except InterruptedError:
            continue
        except ChildProcessError:
            raise LazyfsError(f"container process {pid} is not a child of lazyfs-run") from None
        if reaped == pid:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


OWNER_FILE = "owner.pid"


def reap_stale_containers(state_dir: Path, runc: Runc) -> None:
    """Remove containers whose lazyfs-run was killed before it could clean up."""
    for state in state_dir.glob("lazyfs-*"):
        try:
            owner = int((state / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(owner, 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        log.warning("removing container %s left by lazyfs-run process %d, which is gone", state.name, owner)
        runc.delete(state.name)
        if os.path.ismount(state / "rootfs"):
            unmount(state / "rootfs")
        shutil.rmtree(state, ignore_errors=True)


def _make_searchable(state_dir: Path) -> None:
    mode = stat.S_IMODE(os.stat(state_dir).st_mode)
    if mode & 0o011 != 0o011:
        log.info("making container state directory %s searchable (mode %o) for user namespaces",
                 state_dir, mode | 0o011)
        os.chmod(state_dir, mode | 0o011)


def run_container(request: ContainerRequest, state_dir: Path, runc: Runc | None = None) -> int:
    """Run one container over ``request.image_dir`` and return the command's exit code."""
    runc = runc or Runc()
    container_id = "lazyfs-" + secrets.token_hex(6)
    state = state_dir / container_id
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    owner = None
    if request.id_range is not None:
        owner = (request.id_range.uid_base, request.id_range.gid_base)
        _make_searchable(state_dir)
        check_searchable(state_dir, *owner)
    reap_stale_containers(state_dir, runc)
    try:
        with OverlayRoot(request.image_dir, state, owner) as root:
            (state / OWNER_FILE).write_text(f"{os.getpid()}\n")
            config = request.image_config
            user = resolve_user(root.rootfs, request.user if request.user is not None else config.get("User", ""))
            spec = runtime_spec(
                rootfs=root.rootfs,
                args=command_args(request),
                env=merge_env(config.get("Env") or [], request.env, user),
                cwd=request.workdir or config.get("WorkingDir") or "/",
                user=user,
                hostname=container_id,
                id_range=request.id_range,
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
