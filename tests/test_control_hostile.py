"""Hostile and broken clients on the daemon's control socket.

Every GPU node runs one daemon and all its containers read through the mount,
so no control client may crash, block or stall it. Each test attacks a real
daemon over the sample image. Then it checks that the daemon still replies to
a status request on a new connection and still serves FUSE requests: statfs,
a lookup and a read, in a child process with a timeout, so a hang fails the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lazyfs.control import MAX_REQUEST_BYTES
from lazyfs.control_client import ControlClient
from lazyfs.errors import ControlError
from lazyfs.store import FileStore
from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.sample_image import SMALL_DATA, SampleImage, publish_sample_image

pytestmark = pytest.mark.fuse

NEWLINE = b"\n"
REPLY_TIMEOUT_S = 10.0
FUSE_CHECK_TIMEOUT_S = 10.0
# Growth of the daemon's resident memory that an attack may cause.
MAX_RSS_GROWTH_BYTES = 64 << 20
MANY_CONNECTIONS = 300
# How long a client must keep waiting for room in a full listen backlog.
BACKLOG_WAIT_S = 2.0
PIPELINED_REQUESTS = 2000
# Bytes a client that never reads sends at most before the socket buffers fill.
NEVER_READ_SEND_LIMIT_BYTES = 256 << 20

# Statfs, a lookup of a name never looked up before and a read of a file, in a child
# process: statfs and the new lookup reach the daemon even when the kernel caches
# everything the daemon returned before.
FUSE_CHECK = """
import os, sys
root, missing, path = sys.argv[1:]
os.statvfs(root)
assert not os.path.exists(missing)
with open(path, "rb") as file:
    sys.stdout.buffer.write(file.read())
"""


@dataclass
class Target:
    daemon: DaemonProcess
    sample: SampleImage
    start_rss_bytes: int
    checks: int = 0

    @property
    def digest(self) -> str:
        return self.sample.digest


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    directory = tmp_path_factory.mktemp("hostile")
    store = FileStore(directory / "store")
    sample = publish_sample_image(store, seed=11)
    with running_daemon(directory=directory, store_url=store.url) as daemon:
        yield Target(daemon, sample, rss_bytes(daemon.pid))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS line in /proc/{pid}/status")


def connect(target: Target) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # A blocking connect waits up to SO_SNDTIMEO for room in the listen backlog,
    # where a socket with a Python timeout fails at once with EAGAIN.
    seconds = int(REPLY_TIMEOUT_S)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, 0))
    sock.connect(str(target.daemon.control_socket))
    sock.settimeout(REPLY_TIMEOUT_S)
    return sock


def receive_lines(sock: socket.socket, count: int) -> list[bytes]:
    """Return the next ``count`` lines; raise AssertionError if the daemon closes first."""
    buffer = bytearray()
    while buffer.count(b"\n") < count:
        data = sock.recv(1 << 20)
        assert data, f"the daemon closed the connection after {buffer.count(NEWLINE)} of {count} replies"
        buffer += data
    lines = bytes(buffer).split(b"\n")
    assert len(lines) == count + 1, "the daemon sent more lines than the replies expected"
    assert lines[-1] == b"", "the daemon sent bytes after the replies expected"
    return lines[:count]


def receive_until_closed(sock: socket.socket) -> bytes:
    buffer = bytearray()
    while data := sock.recv(1 << 20):
        buffer += data
    return bytes(buffer)


def ask(target: Target, line: bytes) -> dict:
    """Send one raw request line on a new connection and return the parsed reply."""
    with connect(target) as sock:
        sock.sendall(line)
        [reply] = receive_lines(sock, 1)
    return json.loads(reply)


def control_log_lines(target: Target, offset: int) -> list[str]:
    """Return the control socket's log lines at INFO or above written after ``offset`` characters."""
    text = target.daemon.log_text()[offset:]
    pattern = re.compile(r"\S+ \S+ (INFO|WARNING|ERROR|CRITICAL) lazyfs\.control: ")
    return [line for line in text.splitlines() if pattern.match(line)]


def assert_daemon_serves(target: Target) -> None:
    """Check a status request on a new connection, FUSE requests and the daemon's memory."""
    assert target.daemon.process.poll() is None, "the daemon exited"
    status = ControlClient(target.daemon.control_socket, timeout_s=REPLY_TIMEOUT_S).status()
    assert status["pid"] == target.daemon.pid

    target.checks += 1
    root = target.daemon.image(target.digest)
    result = subprocess.run(
        [sys.executable, "-I", "-c", FUSE_CHECK, str(target.daemon.mountpoint),
         str(root / f"missing-{target.checks}"), str(root / "data" / "small.txt")],
        capture_output=True, timeout=FUSE_CHECK_TIMEOUT_S)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == SMALL_DATA

    growth = rss_bytes(target.daemon.pid) - target.start_rss_bytes
    assert growth < MAX_RSS_GROWTH_BYTES, f"the daemon's RSS grew by {growth} bytes"


def request_line(request: object) -> bytes:
    return json.dumps(request).encode() + b"\n"


STATUS_LINE = request_line({"op": "status"})
SUPPORTED_OPS = "status, image, resolve, sync, trace_save"
HEX_DIGEST = "0" * 64


# ---------------------------------------------------------------------------
# Bad requests that get an error reply today


def image_index_error(value: object) -> str:
    return f"image needs 'index', a 64-digit hex index digest, not {value!r}"


def trace_save_index_error(value: object) -> str:
    return f"trace_save needs 'index', a 64-digit hex index digest, not {value!r}"


def shift_error(value: object) -> str:
    return f"invalid 'shift' {value!r}: expected '<uid base>:<gid base>:<count>' in decimal"


BAD_REQUESTS = {
    "non-object array": (b"[1, 2]\n", "a request must be a JSON object"),
    "non-object string": (b'"status"\n', "a request must be a JSON object"),
    "non-object null": (b"null\n", "a request must be a JSON object"),
    "missing op": (b"{}\n", f"unknown op None; supported: {SUPPORTED_OPS}"),
    "unknown op": (request_line({"op": "format"}), f"unknown op 'format'; supported: {SUPPORTED_OPS}"),
    "op of type int": (request_line({"op": 1}), f"unknown op 1; supported: {SUPPORTED_OPS}"),
    "op with NUL": (request_line({"op": "status\x00"}),
                    f"unknown op 'status\\x00'; supported: {SUPPORTED_OPS}"),
    "resolve without reference": (request_line({"op": "resolve"}),
                                  "resolve needs a non-empty string 'reference'"),
    "resolve reference of type list": (request_line({"op": "resolve", "reference": ["a"]}),
                                       "resolve needs a non-empty string 'reference'"),
    "resolve dot-dot": (request_line({"op": "resolve", "reference": ".."}),
                        "invalid image name '..': expected 1 to 512 characters, not . or .."),
    "resolve manifest digest with path": (
        request_line({"op": "resolve", "reference": "sha256:../../indexes"}),
        "invalid manifest digest 'sha256:../../indexes': expected sha256:<64 hex digits>"),
    "resolve control character": (
        request_line({"op": "resolve", "reference": "team/image\x01"}),
        "invalid image name 'team/image\\x01': control characters are not allowed"),
    "image without index": (request_line({"op": "image"}), image_index_error(None)),
    "image index not hex": (request_line({"op": "image", "index": "g" * 64}), image_index_error("g" * 64)),
    "image index upper case": (request_line({"op": "image", "index": "A" * 64}),
                               image_index_error("A" * 64)),
    "image index too short": (request_line({"op": "image", "index": "0" * 63}),
                              image_index_error("0" * 63)),
    "image index with path": (request_line({"op": "image", "index": "../" + "0" * 61}),
                              image_index_error("../" + "0" * 61)),
    "image index of type int": (request_line({"op": "image", "index": 10 ** 80}),
                                image_index_error(10 ** 80)),
    "image index negative": (request_line({"op": "image", "index": -1}), image_index_error(-1)),
    "trace_save index of type list": (request_line({"op": "trace_save", "index": [HEX_DIGEST]}),
                                      trace_save_index_error([HEX_DIGEST])),
}


@pytest.mark.parametrize("line, error", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_error_reply(target: Target, line: bytes, error: str):
    with connect(target) as sock:
        sock.sendall(line + STATUS_LINE)
        reply, status = receive_lines(sock, 2)
    assert json.loads(reply) == {"error": error}
    # The connection stays open for the next request.
    assert json.loads(status)["pid"] == target.daemon.pid
    assert_daemon_serves(target)


SHIFTS = {
    "negative base": "-1:0:65536",
    "base past the id range": "4294967295:0:1",
    "count of zero": "0:0:0",
    "count of 40 digits": "0:0:" + "9" * 40,
    "path": "../0:0:1",
}


@pytest.mark.parametrize("shift", [*SHIFTS.values(), 7, ["0:0:1"]], ids=[*SHIFTS, "int", "list"])
def test_image_bad_shift_error_reply(target: Target, shift: object):
    reply = ask(target, request_line({"op": "image", "index": target.digest, "shift": shift}))
    assert reply == {"error": shift_error(shift)}
    assert_daemon_serves(target)


INVALID_JSON = {
    "truncated object": b'{"op": "status"\n',
    "NUL byte": b'{"op": "st\x00atus"}\n',
    "binary": bytes(range(256)).replace(b"\n", b""),
    "invalid UTF-8": b'{"op": "\xff\xfe"}\n',
    "empty line": b"\n",
    "integer of 5000 digits": b'{"op": "sync", "n": ' + b"9" * 5000 + b"}\n",
    "trailing data": b'{"op": "status"} {"op": "status"}\n',
}


@pytest.mark.parametrize("line", INVALID_JSON.values(), ids=INVALID_JSON.keys())
def test_invalid_json_error_reply(target: Target, line: bytes):
    if not line.endswith(b"\n"):
        line += b"\n"
    with connect(target) as sock:
        sock.sendall(line + STATUS_LINE)
        reply, status = receive_lines(sock, 2)
    assert list(json.loads(reply)) == ["error"]
    assert json.loads(reply)["error"].startswith("invalid JSON request: ")
    assert json.loads(status)["pid"] == target.daemon.pid
    assert_daemon_serves(target)


def test_resolve_huge_and_negative_numbers(target: Target):
    for value in (10 ** 300, -(10 ** 300), 1e308, -0.0):
        reply = ask(target, request_line({"op": "resolve", "reference": value}))
        assert reply == {"error": "resolve needs a non-empty string 'reference'"}
    assert_daemon_serves(target)


# ---------------------------------------------------------------------------
# Bad requests that today close the connection without a reply


@pytest.mark.parametrize("op", [[], {}, ["status"]], ids=["empty list", "empty object", "list"])
def test_op_unhashable_error_reply(target: Target, op: object):
    offset = len(target.daemon.log_text())
    with connect(target) as sock:
        sock.sendall(request_line({"op": op}) + STATUS_LINE)
        reply, status = receive_lines(sock, 2)
    assert json.loads(reply) == {"error": f"unknown op {op!r}; supported: {SUPPORTED_OPS}"}
    assert json.loads(status)["pid"] == target.daemon.pid
    assert "Traceback" not in target.daemon.log_text()[offset:]
    assert_daemon_serves(target)


NESTED = {
    "arrays": b"[" * 30_000 + b"]" * 30_000,
    "objects": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    "arrays in op": b'{"op": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
}


@pytest.mark.parametrize("document", NESTED.values(), ids=NESTED.keys())
def test_deeply_nested_json_error_reply(target: Target, document: bytes):
    assert len(document) < MAX_REQUEST_BYTES
    offset = len(target.daemon.log_text())
    with connect(target) as sock:
        sock.sendall(document + b"\n" + STATUS_LINE)
        reply, status = receive_lines(sock, 2)
    assert list(json.loads(reply)) == ["error"]
    assert json.loads(status)["pid"] == target.daemon.pid
    assert "Traceback" not in target.daemon.log_text()[offset:]
    assert_daemon_serves(target)


LONE_SURROGATE_ERROR = "the request contains a lone surrogate escape; send valid Unicode"


def test_resolve_lone_surrogate_error_reply(target: Target):
    # JSON allows the escape of a lone UTF-16 surrogate, which no UTF-8 string can contain.
    offset = len(target.daemon.log_text())
    with connect(target) as sock:
        sock.sendall(b'{"op": "resolve", "reference": "team/\\ud800"}\n' + STATUS_LINE)
        reply, status = receive_lines(sock, 2)
    assert json.loads(reply) == {"error": LONE_SURROGATE_ERROR}
    assert json.loads(status)["pid"] == target.daemon.pid
    assert "Traceback" not in target.daemon.log_text()[offset:]
    assert_daemon_serves(target)


def test_image_shift_lone_surrogate_error_reply(target: Target):
    offset = len(target.daemon.log_text())
    line = b'{"op": "image", "index": "%s", "shift": "0:0:1\\udc80"}\n' % target.digest.encode()
    with connect(target) as sock:
        sock.sendall(line + STATUS_LINE)
        reply, status = receive_lines(sock, 2)
    assert json.loads(reply) == {"error": LONE_SURROGATE_ERROR}
    assert json.loads(status)["pid"] == target.daemon.pid
    assert "Traceback" not in target.daemon.log_text()[offset:]
    assert_daemon_serves(target)


# ---------------------------------------------------------------------------
# An index digest followed by a newline passes as an index digest today


def test_image_index_trailing_newline_rejected(target: Target):
    index = target.digest + "\n"
    reply = ask(target, request_line({"op": "image", "index": index}))
    assert reply == {"error": image_index_error(index)}
    assert_daemon_serves(target)


def test_trace_save_index_trailing_newline_rejected(target: Target):
    index = target.digest + "\n"
    reply = ask(target, request_line({"op": "trace_save", "index": index}))
    assert reply == {"error": trace_save_index_error(index)}
    assert_daemon_serves(target)


def test_resolve_trailing_newline_not_a_digest(target: Target):
    reply = ask(target, request_line({"op": "resolve", "reference": target.digest + "\n"}))
    assert "index" not in reply
    assert list(reply) == ["error"]
    assert_daemon_serves(target)


# ---------------------------------------------------------------------------
# Logging of bad requests


LOGGED_REQUESTS = {
    "invalid JSON": b"{\n",
    "non-object": b"[]\n",
    "unknown op": request_line({"op": "format"}),
    "image index not hex": request_line({"op": "image", "index": "g" * 64}),
}


@pytest.mark.parametrize("line", LOGGED_REQUESTS.values(), ids=LOGGED_REQUESTS.keys())
def test_bad_request_logs_one_line(target: Target, line: bytes):
    offset = len(target.daemon.log_text())
    with connect(target) as sock:
        # The status reply comes after the bad request's log line, on the same connection.
        sock.sendall(line + STATUS_LINE)
        reply, _status = receive_lines(sock, 2)
    assert list(json.loads(reply)) == ["error"]
    lines = control_log_lines(target, offset)
    assert len(lines) == 1, lines
    assert "Traceback" not in target.daemon.log_text()[offset:]


# ---------------------------------------------------------------------------
# Attacks on the stream


def test_overlong_line_closes_connection(target: Target):
    sent = 0
    received = b""
    with connect(target) as sock:
        chunk = b"x" * (1 << 20)
        try:
            while sent < 16 << 20:
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        # The daemon closes with unread bytes queued, so Linux may reset the
        # connection and drop the error reply; either ending is allowed.
        try:
            received = receive_until_closed(sock)
        except ConnectionResetError:
            pass
    assert received in (b"", b'{"error":"request longer than %d bytes"}\n' % MAX_REQUEST_BYTES)
    assert sent < 16 << 20, "the daemon read 16 MiB of one line without closing the connection"
    assert_daemon_serves(target)


def test_half_lines_left_open(target: Target):
    sockets = [connect(target) for _ in range(MANY_CONNECTIONS)]
    try:
        for sock in sockets:
            sock.sendall(STATUS_LINE + b'{"op": "sta')
        # A reply on every connection shows that the daemon accepted them all.
        for sock in sockets:
            [reply] = receive_lines(sock, 1)
            assert json.loads(reply)["pid"] == target.daemon.pid
        assert_daemon_serves(target)
        for sock in sockets:
            sock.sendall(b'tus"}\n')
        for sock in sockets:
            [reply] = receive_lines(sock, 1)
            assert json.loads(reply)["pid"] == target.daemon.pid
    finally:
        for sock in sockets:
            sock.close()
    assert_daemon_serves(target)


def test_many_connections_at_once(target: Target):
    sockets = [connect(target) for _ in range(MANY_CONNECTIONS)]
    try:
        for sock in sockets:
            sock.sendall(STATUS_LINE + b"[]\n")
        for sock in sockets:
            status, error = receive_lines(sock, 2)
            assert json.loads(status)["pid"] == target.daemon.pid
            assert json.loads(error) == {"error": "a request must be a JSON object"}
        assert_daemon_serves(target)
    finally:
        for sock in sockets:
            sock.close()
    assert_daemon_serves(target)


def test_status_waits_for_full_backlog(target: Target):
    # A stopped daemon accepts nothing, so connections fill its listen backlog, as a
    # flood of clients faster than the accept loop does. ControlClient, which lazyfs
    # status and lazyfs-run use, must wait its timeout for room, not fail at once.
    flood = []
    results: list[object] = []

    def request_status() -> None:
        try:
            results.append(ControlClient(target.daemon.control_socket, timeout_s=REPLY_TIMEOUT_S).status())
        except ControlError as exc:
            results.append(exc)

    os.kill(target.daemon.pid, signal.SIGSTOP)
    try:
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            flood.append(sock)
            try:
                sock.connect(str(target.daemon.control_socket))
            except BlockingIOError:
                break
        client = threading.Thread(target=request_status)
        client.start()
        # A client that waits for room is still connecting when the deadline passes.
        client.join(BACKLOG_WAIT_S)
    finally:
        os.kill(target.daemon.pid, signal.SIGCONT)
    client.join(REPLY_TIMEOUT_S)
    for sock in flood:
        sock.close()

    assert len(results) == 1
    assert isinstance(results[0], dict), results[0]
    assert results[0]["pid"] == target.daemon.pid
    assert_daemon_serves(target)


def test_client_that_never_reads(target: Target):
    with connect(target) as sock:
        sock.setblocking(False)
        sent = 0
        while sent < NEVER_READ_SEND_LIMIT_BYTES:
            try:
                sent += sock.send(STATUS_LINE * 1000)
            except BlockingIOError:
                break
        assert sent < NEVER_READ_SEND_LIMIT_BYTES, "the daemon kept reading without sending replies"
        # Both socket buffers are full, and the daemon waits on this client only.
        assert_daemon_serves(target)
    assert_daemon_serves(target)


def test_client_closes_mid_reply(target: Target):
    offset = len(target.daemon.log_text())
    with connect(target) as sock:
        sock.sendall(STATUS_LINE * 200)
        assert len(sock.recv(100)) > 0
        # Closing with unread replies makes the daemon's next send fail.
    assert_daemon_serves(target)
    assert "Traceback" not in target.daemon.log_text()[offset:]


def test_requests_faster_than_read(target: Target):
    lines = [STATUS_LINE if number % 2 == 0 else b'{"op": 7}\n' for number in range(PIPELINED_REQUESTS)]
    failures: list[BaseException] = []

    with connect(target) as sock:
        def send() -> None:
            try:
                sock.sendall(b"".join(lines))
            except OSError as exc:
                failures.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            replies = receive_lines(sock, PIPELINED_REQUESTS)
        finally:
            sender.join(REPLY_TIMEOUT_S)
    assert not failures
    for number, reply in enumerate(replies):
        if number % 2 == 0:
            assert json.loads(reply)["pid"] == target.daemon.pid
        else:
            assert json.loads(reply) == {"error": f"unknown op 7; supported: {SUPPORTED_OPS}"}
    assert_daemon_serves(target)


def test_bad_request_on_one_connection_spares_another(target: Target):
    hostile_lines = [b'{"op": []}\n', b"[" * 30_000 + b"\n", b"x" * (MAX_REQUEST_BYTES + 1)]
    with connect(target) as healthy:
        for line in hostile_lines:
            with connect(target) as hostile:
                hostile.sendall(line)
                healthy.sendall(STATUS_LINE)
                [status] = receive_lines(healthy, 1)
                assert json.loads(status)["pid"] == target.daemon.pid
    assert_daemon_serves(target)
