"""Daemon logging: rate-limited repeats, redacted secrets, and the lines a real daemon writes."""

from __future__ import annotations

import errno
import io
import logging
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazyfs import logutil
from lazyfs.config import DaemonConfig
from lazyfs.daemon import log_configuration
from lazyfs.logutil import RateLimitedLog, SecretFilter, image_context, redact
from lazyfs.store import FileStore, StoreOptions, open_store
from tests.support.daemon import running_daemon
from tests.support.faultproxy import FaultProxy
from tests.support.net import LOOPBACK
from tests.support.sample_image import publish_single_file_image

ACCESS_KEY = "AKIALAZYFSLOGTEST0001"
SECRET_KEY = "lazyfs/Secret+Key/0123456789abcdefghijkl"
SESSION_TOKEN = "lazyfs-session-token-9876543210zyxwvu"


class FakeClock:
    """A clock for RateLimitedLog that moves only when the test advances ``now``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose lines go through a SecretFilter into a string buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(SecretFilter())
    logger = logging.getLogger("tests.logutil.captured")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, buffer
    finally:
        logger.removeHandler(handler)


def lines(buffer: io.StringIO) -> list[str]:
    return buffer.getvalue().splitlines()


# ---------------------------------------------------------------------------
# Rate limit


def test_rate_limit_one_line_per_key_per_interval(captured):
    logger, buffer = captured
    clock = FakeClock()
    limiter = RateLimitedLog(logger, interval_s=60.0, clock=clock)

    assert limiter.log(logging.ERROR, b"\x01", "read of chunk %s failed", "01") is True
    for _ in range(3):
        assert limiter.log(logging.ERROR, b"\x01", "read of chunk %s failed", "01") is False
    assert limiter.log(logging.ERROR, b"\x02", "read of chunk %s failed", "02") is True
    clock.now += 59.9
    assert limiter.log(logging.ERROR, b"\x01", "read of chunk %s failed", "01") is False
    clock.now += 0.1
    assert limiter.log(logging.ERROR, b"\x01", "read of chunk %s failed", "01") is True
    assert limiter.log(logging.ERROR, b"\x01", "read of chunk %s failed", "01") is False

    assert lines(buffer) == [
        "ERROR read of chunk 01 failed",
        "ERROR read of chunk 02 failed",
        "ERROR read of chunk 01 failed (4 similar lines suppressed in the last 60 s)",
    ]
    assert limiter.suppressed == 5


def test_rate_limit_flush_counts(captured):
    logger, buffer = captured
    clock = FakeClock()
    limiter = RateLimitedLog(logger, interval_s=10.0, clock=clock)
    for _ in range(3):
        limiter.log(logging.WARNING, ("get", "chunks/ab", 1), "retry")
    limiter.log(logging.WARNING, "quiet", "once")

    logutil.flush_suppressed()
    logutil.flush_suppressed()

    assert lines(buffer) == ["WARNING retry", "WARNING once",
                             "INFO 2 similar lines suppressed for get chunks/ab 1"]


def test_rate_limit_skips_disabled_level(captured):
    logger, buffer = captured
    logger.setLevel(logging.WARNING)
    limiter = RateLimitedLog(logger, clock=FakeClock())
    assert limiter.log(logging.DEBUG, "key", "hidden") is False
    assert limiter.log(logging.WARNING, "key", "shown") is True
    assert lines(buffer) == ["WARNING shown"]
    assert limiter.suppressed == 0


def test_rate_limit_rejects_zero_interval():
    with pytest.raises(ValueError, match="interval_s must be > 0, not 0"):
        RateLimitedLog(logging.getLogger(__name__), interval_s=0)


# ---------------------------------------------------------------------------
# Secrets


@pytest.mark.parametrize(("text", "expected"), [
    ("endpoint https://user:hunter22@s3.example:9000/bucket",
     "endpoint https://user:***@s3.example:9000/bucket"),
    ("headers={'Authorization': b'AWS4-HMAC-SHA256 Credential=AKIAX/2026/s3, Signature=abc'}",
     "headers={'Authorization': b'***'}"),
    ("Authorization: Bearer abc.def", "Authorization: ***"),
    ("GET /b/k?X-Amz-Credential=AKIAX%2F2026&X-Amz-Signature=0f1e&x=1",
     "GET /b/k?X-Amz-Credential=***&X-Amz-Signature=***&x=1"),
    ("{'X-Amz-Security-Token': 'FwoGZXIvYXdzE'}", "{'X-Amz-Security-Token': '***'}"),
    ("password=hunter22 user=alice", "password=*** user=alice"),
    ("aws_secret_access_key = wJalrXUtnFEMI", "aws_secret_access_key = ***"),
    ("get chunks/ab failed (attempt 1 of 5)", "get chunks/ab failed (attempt 1 of 5)"),
])
def test_redact_patterns(text, expected):
    assert redact(text) == expected


def test_redact_environment_and_registered(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    logutil.register_secret(SESSION_TOKEN)
    logutil.register_secret("ab")
    text = f"key {ACCESS_KEY} secret {SECRET_KEY} token {SESSION_TOKEN} ab"
    assert redact(text) == "key *** secret *** token *** ab"


def test_filter_redacts_args_and_traceback(captured, monkeypatch: pytest.MonkeyPatch):
    logger, buffer = captured
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    logger.warning("using %s", SECRET_KEY)
    try:
        raise RuntimeError(f"request signed with {SECRET_KEY} failed")
    except RuntimeError:
        logger.exception("store request failed")
    output = buffer.getvalue()
    assert SECRET_KEY not in output
    assert "WARNING using ***\n" in output
    assert "RuntimeError: request signed with *** failed" in output


def test_configuration_line_redacts_url_password(captured, monkeypatch: pytest.MonkeyPatch):
    logger, buffer = captured
    monkeypatch.setattr("lazyfs.daemon.log", logger)
    config = DaemonConfig(s3_endpoint_url="https://operator:pa55-word@s3.example", log_level="debug")
    log_configuration(config)
    [line] = lines(buffer)
    assert "pa55-word" not in line
    assert line.startswith("INFO configuration: store_url='file:///var/lib/lazyfs/store', "
                           "s3_endpoint_url='https://operator:***@s3.example', ")
    assert ", ram_cache_bytes=536870912, " in line
    assert ", log_level='debug', " in line


def test_image_context_nests():
    assert logutil.current_image() is None
    with image_context("aa" * 32):
        with image_context("bb" * 32):
            assert logutil.current_image() == "bb" * 32
        assert logutil.current_image() == "aa" * 32
    assert logutil.current_image() is None


# ---------------------------------------------------------------------------
# A real daemon


@pytest.mark.fuse
def test_daemon_logs_retries_without_secrets(tmp_path: Path, s3_server, s3_bucket: str,
                                             monkeypatch: pytest.MonkeyPatch):
    s3_store = open_store(f"s3://{s3_bucket}/lazyfs", StoreOptions(endpoint_url=s3_server.endpoint_url))
    digest, addresses = publish_single_file_image(s3_store, b"s" * 100)
    s3_store.close()
    # The daemon inherits these; moto accepts any credentials.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    upstream_port = urllib.parse.urlsplit(s3_server.endpoint_url).port
    # Boot traces are off, because their lookup would take a place in the fault sequence.
    with FaultProxy(LOOPBACK, upstream_port, ["pass", "503", "503"]) as proxy:
        with running_daemon(directory=tmp_path, store_url=f"s3://{s3_bucket}/lazyfs",
                            s3_endpoint_url=proxy.endpoint_url, log_level="debug",
                            trace_replay=False) as daemon:
            assert (daemon.image(digest) / "file.bin").read_bytes() == b"s" * 100
        log_text = daemon.log_text()

    # Every request carried the credentials, so the daemon did use them.
    assert all(ACCESS_KEY in headers["Authorization"] for headers in proxy.request_headers)
    for secret in (ACCESS_KEY, SECRET_KEY, SESSION_TOKEN):
        assert secret not in log_text
    chunk = f"chunks/{addresses[0].hex()}"
    for attempt, level in ((1, "INFO"), (2, "WARNING")):
        pattern = (rf" {level} lazyfs\.store: get {chunk} for image {digest} failed "
                   rf"\(attempt {attempt} of 5\), retrying in \d+\.\d\ds: ")
        assert len(re.findall(pattern, log_text)) == 1, pattern
    assert f"lazyfs daemon {daemon.pid} starting: store s3://{s3_bucket}/lazyfs" in log_text
    assert f"INFO lazyfs.daemon: configuration: store_url='s3://{s3_bucket}/lazyfs', " in log_text
    assert f"INFO lazyfs.daemon: lazyfs daemon {daemon.pid} stopped" in log_text


@pytest.mark.fuse
def test_daemon_rate_limits_read_errors(tmp_path: Path):
    store = FileStore(tmp_path / "store")
    digest, addresses = publish_single_file_image(store, b"e" * 100, store_chunks=False)
    with running_daemon(directory=tmp_path, store_url=store.url) as daemon:
        for _ in range(3):
            with pytest.raises(OSError) as caught:
                (daemon.image(digest) / "file.bin").read_bytes()
            assert caught.value.errno == errno.EIO
        read_errors = daemon.status()["images"][digest]["read_errors"]
        assert daemon.stop() == 0
    log_text = daemon.log_text()

    chunk = addresses[0].hex()
    error_lines = [line for line in log_text.splitlines() if " ERROR " in line and chunk in line]
    assert len(error_lines) == 1, error_lines
    assert f"failed with EIO: image {digest}, chunk {chunk}: object not found in store: " in error_lines[0]
    # Each failed FUSE read is one read error; the kernel may retry a read once.
    assert read_errors >= 3
    assert f"INFO lazyfs.fuse_ops: {read_errors - 1} similar lines suppressed for {chunk}" in log_text
