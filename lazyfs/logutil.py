"""Logging helpers of the daemon: rate-limited repeats, secret redaction, image context.

``RateLimitedLog`` lets one line per key through per interval. It counts the
lines it suppresses and appends that count to the next line of the key, so an
operator sees how often a failure repeated without one line per read.
``flush_suppressed`` logs the counts still pending, for example at shutdown.

``SecretFilter`` sits on the daemon's log handlers and rewrites every record
before it is written. It replaces the values of the AWS credential variables,
credentials registered with ``register_secret`` (the S3 store registers the
ones boto3 resolved), passwords in URLs and ``Authorization``, ``Credential=``,
``Signature=`` and security token values with ``***``.

``image_context`` names the image that a chunk fetch is for. Store retries
run in worker threads, and trio copies the context variables into them, so a
retry line can name the image digest next to the chunk address.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterator

REDACTED = "***"

# Environment variables whose values never appear in a log line.
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN",
                    "AWS_SECURITY_TOKEN")

# Registered secrets shorter than this are not replaced: replacing a
# two-letter word everywhere would garble the log and protect nothing.
MIN_SECRET_CHARS = 4

DEFAULT_INTERVAL_S = 60.0
# Keys remembered by one RateLimitedLog; the least recently logged is forgotten first.
MAX_KEYS = 4096

# Each pattern keeps its group "keep" and replaces the rest of its match by ``***``.
_SECRET_PATTERNS = (
    # user:password@ in a URL.
    re.compile(r"(?P<keep>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)[^/\s@]+(?=@)"),
    # Header values quoted in a dict, as botocore prints them: 'Authorization': b'...'.
    re.compile(r"(?P<keep>['\"](?:authorization|x-amz-security-token)['\"]\s*:\s*b?['\"])[^'\"]*",
               re.IGNORECASE),
    # Header lines: "Authorization: ..." up to the end of the line.
    re.compile(r"(?P<keep>\b(?:authorization|x-amz-security-token):\s*)(?!b?['\"])[^\r\n]+",
               re.IGNORECASE),
    # SigV4 parts and presigned URL parameters.
    re.compile(r"(?P<keep>\b(?:Credential|Signature|X-Amz-Credential|X-Amz-Signature|"
               r"X-Amz-Security-Token)=)[^\s,&'\"]+", re.IGNORECASE),
    # key = value pairs that name a secret: password=..., aws_secret_access_key: ...
    re.compile(r"(?P<keep>\b(?:password|passwd|secret_access_key|aws_secret_access_key|"
               r"session_token|aws_session_token)['\"]?\s*[:=]\s*['\"]?)[^\s'\",}&]+",
               re.IGNORECASE),
)

_registered_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Add a value that ``SecretFilter`` replaces in every later log line."""
    if value and len(value) >= MIN_SECRET_CHARS:
        with _secrets_lock:
            _registered_secrets.add(value)


def _secret_values() -> list[str]:
    values = {os.environ.get(name) for name in SECRET_VARIABLES}
    with _secrets_lock:
        values.update(_registered_secrets)
    # Longest first, so a secret that contains another is replaced whole.
    return sorted((value for value in values if value and len(value) >= MIN_SECRET_CHARS),
                  key=len, reverse=True)


def redact(text: str) -> str:
    """Return ``text`` with every known secret and secret-shaped value replaced by ``***``."""
    for value in _secret_values():
        text = text.replace(value, REDACTED)
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda match: match.group("keep") + REDACTED, text)
    return text


class SecretFilter(logging.Filter):
    """A handler filter that redacts each record's message and traceback; it drops nothing."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


# ---------------------------------------------------------------------------
# Rate limiting

_limiters: "weakref.WeakSet[RateLimitedLog]" = weakref.WeakSet()


class RateLimitedLog:
    """Log at most one line per key per ``interval_s`` seconds; count the rest.

    Thread-safe, so store retries in worker threads can share one instance.
    ``clock`` returns seconds and exists for tests.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, not {interval_s}")
        self.logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [time of the last line written, lines suppressed since then]
        self._keys: OrderedDict[Hashable, list] = OrderedDict()
        self.suppressed = 0
        _limiters.add(self)

    def log(self, level: int, key: Hashable, message: str, *args: Any, **kwargs: Any) -> bool:
        """Log ``message % args`` unless ``key`` was logged less than ``interval_s`` ago.

        Returns whether the line was written. A written line ends with the
        number of lines of the key suppressed since its last line, if any.
        """
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        with self._lock:
            state = self._keys.get(key)
            if state is not None and now - state[0] < self.interval_s:
                state[1] += 1
                self.suppressed += 1
                return False
            suppressed = 0 if state is None else state[1]
            self._keys[key] = [now, 0]
            self._keys.move_to_end(key)
            if len(self._keys) > MAX_KEYS:
                self._keys.popitem(last=False)
        if suppressed:
            message += " (%d similar lines suppressed in the last %g s)"
            args = (*args, suppressed, self.interval_s)
        kwargs.setdefault("stacklevel", 2)
        self.logger.log(level, message, *args, **kwargs)
        return True

    def flush(self) -> None:
        """Log the count of suppressed lines of every key that has one, and reset them."""
        with self._lock:
            pending = [(key, state[1]) for key, state in self._keys.items() if state[1]]
            for state in self._keys.values():
                state[1] = 0
        for key, count in pending:
            self.logger.info("%d similar lines suppressed for %s", count, _describe_key(key))


def _describe_key(key: Hashable) -> str:
    if isinstance(key, bytes):
        return key.hex()
    if isinstance(key, tuple):
        return " ".join(_describe_key(part) for part in key)
    return str(key)


def flush_suppressed() -> None:
    """Flush every live ``RateLimitedLog``."""
    for limiter in list(_limiters):
        limiter.flush()


# ---------------------------------------------------------------------------
# Image context

_current_image: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lazyfs_current_image", default=None)


@contextlib.contextmanager
def image_context(digest: str) -> Iterator[None]:
    """Name the image whose chunks the code inside the block fetches."""
    token = _current_image.set(digest)
    try:
        yield
    finally:
        _current_image.reset(token)


def current_image() -> str | None:
    """Return the digest set by the innermost ``image_context``, or None."""
    return _current_image.get()


def image_phrase(preposition: str) -> str:
    """Return " <preposition> image <digest>" inside an ``image_context``, else "" (for log lines)."""
    digest = _current_image.get()
    return f" {preposition} image {digest}" if digest else ""
