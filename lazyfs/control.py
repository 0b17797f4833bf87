"""The daemon's control socket: newline-delimited JSON over a Unix stream socket.

A client sends one JSON object per line and reads one JSON object per line, in
order, on one connection for as many requests as it likes. Requests:

``{"op": "status"}`` returns::

    {
      "mountpoint": "/run/lazyfs/mnt",
      "store_url": "s3://bucket/prefix",
      "pid": 1234,
      "started_at_ns": 1700000000000000000,
      "images": {"<index digest>": {"base_inode", "inodes", "size_bytes", "chunks",
                                    "attached_at_ns", "reads", "bytes_read", "chunk_reads",
                                    "fetched_chunks", "fetched_bytes", "read_errors"}},
      "tiers": {"ram":   {"hits", "misses", "bytes_served", "entries", "used_bytes", ...},
                "disk":  {"hits", "misses", "bytes_served", "corrupt", "evictions", ...},
                "store": {"requests", "bytes", "hits", "bytes_served", "not_found",
                          "integrity_errors", "errors", "timeouts", ...}},
      "indexes": {"index_fetches", "index_cache_hits"},
      "chain": {"joined", "failed_fast", "fill_errors", "in_flight", "fill_queue", ...},
      "readahead": {"prefetches", "prefetches_dropped", "prefetch_errors", "prefetching"},
      "store_requests": {"get": n, ...},
      "store_results": {"get": {"ok": n, "not_found": n, "unavailable": n, "error": n}, ...},
      "store_retries": {"get": n, ...},
      "traces": {"<index digest>": {"state", "recording_chunks", "trace_chunks", "saved_chunks",
                                    "replay_fetched", "replay_cached", "replay_skipped",
                                    "replay_errors"}}
    }

with every counter an integer. ``tiers`` has one key per configured tier, so
"ram" or "disk" is absent when its size is 0. A tier's ``bytes_served`` counts
whole chunks returned, not the slices of them that reads used. In the store
tier, ``bytes`` counts the stored (compressed) bytes received. ``store_requests``
counts every request of the daemon's store client by operation, index fetches
included, and is empty when the daemon has not contacted the store.
``store_results`` counts the same requests once finished, by result, with only
the results that occurred; ``store_retries`` counts retried temporary failures.
``chain.in_flight`` is the number of chunk fetches running now.
``traces`` lists the images whose boot trace is recorded or replayed
(``lazyfs.prefetch``); its ``state`` is a word such as "recording",
"replaying", "replayed" or "saved".

``{"op": "resolve", "reference": REF}`` returns ``{"index": "<hex>"}`` for an
image name, a manifest digest (``sha256:...``) or an index digest.

``{"op": "image", "index": "<hex>"}`` attaches the image if needed and returns
``{"index", "config", "source", "files", "size_bytes", "path"}``, where ``config`` is
the image config the runtime needs (Entrypoint, Cmd, Env, WorkingDir, User)
and ``path`` the image's directory relative to the mount point. With
``"shift": "<uid base>:<gid base>:<count>"`` the request attaches the image's
view with shifted owners too, and ``path`` names that view (the layout is in
``lazyfs.tree``).

``{"op": "sync"}`` returns ``{}`` once every boot trace load, replay and
automatic save, and then every queued background write to the disk tier, has
finished.

``{"op": "trace_save", "index": "<hex>"}`` ends the image's boot trace
recording and writes the trace to the store unless a valid one exists there;
it returns ``{"index", "saved", "chunks", "state"}``, with ``saved`` false when
nothing was written (not recording, no chunks read, or a trace exists).

Any other request, and any request that fails, returns ``{"error": "<message>"}``
and logs that message at INFO.

Access: the socket is created with mode 0600 in a directory that is created
with mode 0700 when it does not exist, so only its owner (normally root) can
connect.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

from .control_client import ControlClient  # noqa: F401 - re-exported for callers
from .errors import ControlError, DaemonError, LazyfsError

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 << 10


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlServer:
    """The control socket server at ``path``.

    ``status()`` builds each status response; ``handlers`` maps every other op
    to an async function of the request. A handler's LazyfsError becomes the
    error response.
    """

    def __init__(self, path: str | Path, status: Callable[[], dict[str, Any]],
                 handlers: dict[str, Handler] | None = None):
        self.path = Path(path)
        self._status = status
        self._handlers = dict(handlers or {})

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Bind the socket, report started, and serve until cancelled; then remove the socket."""
        sock = await self._bind()
        listener = trio.SocketListener(sock)
        identity = os.stat(self.path)
        log.info("control socket listening at %s", self.path)
        try:
            task_status.started()
            await trio.serve_listeners(self._serve_connection, [listener])
        finally:
            self._remove_socket_file(identity)
            with trio.CancelScope(shield=True):
                await listener.aclose()

    async def _bind(self) -> trio.socket.SocketType:
        directory = self.path.parent
        if not directory.exists():
            directory.mkdir(parents=True, mode=0o700)
            os.chmod(directory, 0o700)
        await self._remove_stale_socket()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The umask makes the socket 0600 from the moment it exists.
        old_umask = os.umask(0o177)
        try:
            await sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            raise DaemonError(f"cannot bind control socket {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        return sock

    async def _remove_stale_socket(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise DaemonError(f"control socket path {self.path} exists and is not a socket; remove it")
        probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await probe.connect(str(self.path))
        except OSError:
            log.info("removing stale control socket %s", self.path)
            self.path.unlink(missing_ok=True)
            return
        finally:
            probe.close()
        raise DaemonError(f"another daemon is serving the control socket {self.path}")

    def _remove_socket_file(self, identity: os.stat_result) -> None:
        # Remove the socket only if it is still ours, not a newer daemon's.
        try:
            current = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (current.st_dev, current.st_ino) == (identity.st_dev, identity.st_ino):
            self.path.unlink(missing_ok=True)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                await self._answer_requests(stream)
        except trio.BrokenResourceError:
            log.debug("control client disconnected before reading its response")
        except Exception:
            log.exception("control connection failed")

    async def _answer_requests(self, stream: trio.SocketStream) -> None:
        buffer = bytearray()
        while True:
            data = await stream.receive_some(MAX_REQUEST_BYTES)
            if not data:
                return
            buffer += data
            while (newline := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:newline])
                del buffer[:newline + 1]
                await stream.send_all(_encode(await self.respond(line)))
            if len(buffer) > MAX_REQUEST_BYTES:
                await stream.send_all(_encode({"error": f"request longer than {MAX_REQUEST_BYTES} bytes"}))
                return

    async def respond(self, line: bytes) -> dict[str, Any]:
        """Return the response object for one request line; log each error response."""
        try:
            request = json.loads(line)
        except (ValueError, RecursionError) as exc:
            return _rejected(None, f"invalid JSON request: {exc}")
        if not isinstance(request, dict):
            return _rejected(None, "a request must be a JSON object")
        op = request.get("op")
        try:
            json.dumps(request, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            # Handlers encode names and paths, so a lone surrogate escape (\ud800) must not reach them.
            return _rejected(op, "the request contains a lone surrogate escape; send valid Unicode")
        if op == "status":
            return self._status()
        handler = self._handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            supported = ", ".join(["status", *sorted(self._handlers)])
            return _rejected(op, f"unknown op {op!r}; supported: {supported}")
        try:
            return await handler(request)
        except LazyfsError as exc:
            return _rejected(op, str(exc))


def _rejected(op: object, message: str) -> dict[str, Any]:
    """Log a failed control request and return its error response."""
    log.info("control request %.100r failed: %s", op, message)
    return {"error": message}


def _encode(response: dict[str, Any]) -> bytes:
    return json.dumps(response, separators=(",", ":")).encode() + b"\n"
