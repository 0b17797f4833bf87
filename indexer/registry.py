"""A registry (OCI distribution API v2) as an image source.

Requests go over HTTPS with certificate checks. Plain HTTP is used only with
``RegistryOptions.plain_http``, and only towards loopback hosts (127.0.0.0/8,
::1, "localhost"): that is checked before any connection, and again for every
redirect and token server URL, so credentials and image bytes never cross a
network unencrypted.

Authentication follows the registry's 401 challenge: ``Bearer`` fetches a
token from the named realm (anonymously, or with basic credentials when a
username is given), ``Basic`` sends the credentials directly. The
Authorization header goes only to the registry's own origin and the token
realm, never to a redirect target such as a storage URL.

Without a username, the credentials come from the ``auths`` entry for the
registry host in ``$DOCKER_CONFIG/config.json`` (default
``~/.docker/config.json``), when one exists. A 401 during a run (an expired
token) fetches new credentials and repeats the request once.

Every request has a socket timeout and an overall deadline of the same
length, so a server that sends one byte a second cannot stall a run.
Connection failures and 429 or 5xx responses are retried with exponential,
jittered backoff that waits at least as long as a Retry-After header requests.
A blob body that breaks off, or misses its deadline, is resumed with a Range
request from the first byte not yet received. When the server does not
return a 206 with the matching Content-Range, the blob is read again from
byte 0, skipping the bytes already delivered, so the caller's digest check
covers one contiguous stream.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import random
import re
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .. import __version__
from . import mediatypes
from ..errors import IntegrityError
from .errors import ImageError, SourceError, UsageError
from .manifest import MAX_MANIFEST_BYTES, Descriptor
from .source import TAG, RootDocument, Source, split_digest_suffix
from .verify import check_digest, verify_bytes
from .streams import READ_SIZE, ReadStream

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MAX_TOKEN_RESPONSE_BYTES = 1 << 20
# A Retry-After longer than this is cut to it, so one header cannot park a run for hours.
MAX_RETRY_AFTER_S = 60.0
MAX_BACKOFF_S = 30.0
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_REPOSITORY = re.compile(
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_CHALLENGE_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach a registry."""

    plain_http: bool = False
    username: str | None = None
    password: str | None = None
    timeout_s: float = 30.0
    """Socket timeout and overall deadline of each request, in seconds."""
    retries: int = 5
    """Retries of one request, or resumes of one blob, after the first attempt."""
    backoff_base_s: float = 0.5
    docker_config: bool = True
    """Whether to read credentials from the Docker client config when no username is given."""

    @property
    def attempts(self) -> int:
        return self.retries + 1


def is_loopback_host(host: str) -> bool:
    """Return whether ``host`` (a name or IP literal, brackets allowed) is a loopback address.

    Names are not resolved: "localhost" is the only name accepted.
    """
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Parse a WWW-Authenticate header into (lower-case scheme, parameters)."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    position = 0
    while position < len(rest):
        match = _CHALLENGE_PARAM.match(rest, position)
        if match is None:
            break
        name, quoted, token = match.groups()
        params[name.lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else token
        position = match.end()
    return scheme.lower(), params


class _ReadFailed(SourceError):
    """A response body broke off, or missed its deadline; a blob can resume after it."""


class _Body:
    """A response body stream that owns its connection and reports read failures as SourceError.

    ``deadline`` is a ``time.monotonic()`` value: no read blocks beyond it.
    """

    def __init__(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse,
                 label: str, deadline: float, timeout_s: float):
        self._connection = connection
        self.response = response
        self._label = label
        self._deadline = deadline
        self._timeout_s = timeout_s

    def read(self, size: int = -1) -> bytes:
        """Read ``size`` bytes, or to EOF when ``size`` is negative; fewer only at EOF."""
        pieces = []
        total = 0
        while size is None or size < 0 or total < size:
            want = READ_SIZE if size is None or size < 0 else min(size - total, READ_SIZE)
            piece = self.read_some(want)
            if not piece:
                break
            pieces.append(piece)
            total += len(piece)
        return b"".join(pieces)

    def read_some(self, size: int) -> bytes:
        """Read at most ``size`` bytes with one socket read; b"" only at EOF."""
        if size == 0:
            return b""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise self._timed_out()
        if self._connection.sock is not None:
            self._connection.sock.settimeout(min(self._timeout_s, remaining))
        try:
            data = self.response.read1(size)
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() >= self._deadline:
                raise self._timed_out() from None
            raise _ReadFailed(f"{self._label}: reading the response failed: {exc!r}") from None
        # http.client returns b"" when the connection closes before
        # Content-Length is reached, leaving the missing count in ``length``.
        if not data and self.response.length:
            raise _ReadFailed(f"{self._label}: the connection closed with {self.response.length} bytes "
                              "of the response missing")
        return data

    def _timed_out(self) -> _ReadFailed:
        return _ReadFailed(f"{self._label}: timed out: the response did not complete within "
                           f"{self._timeout_s:g} s (--timeout)")

    def close(self) -> None:
        self.response.close()
        self._connection.close()

    def __enter__(self) -> "_Body":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _BlobStream(ReadStream):
    """A blob body that resumes after a broken or late response, up to ``retries`` times.

    A resume requests ``Range: bytes=OFFSET-``. Only a 206 whose Content-Range
    starts at OFFSET is appended as is. After any other response the blob is
    requested again without a Range header, and its first OFFSET bytes are
    dropped.

    NOTE: each request of a blob, the first included, must complete within
    ``timeout_s``, so a blob gets at most ``retries + 1`` such periods. A
    large layer on a slow link needs a larger ``--timeout``.
    """

    def __init__(self, client: "RegistryClient", url: str, label: str):
        super().__init__()
        self._client = client
        self._url = url
        self._label = label
        self._body: _Body | None = client._get(url, {}, label)
        self._offset = 0
        self._skip = 0
        self._resumes = 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        while True:
            try:
                self._drop_skipped()
                data = self._body.read_some(min(size, READ_SIZE))
            except _ReadFailed as exc:
                self._resume(exc)
                continue
            self._offset += len(data)
            return data

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
        super().close()

    def _drop_skipped(self) -> None:
        while self._skip:
            dropped = self._body.read_some(min(self._skip, READ_SIZE))
            if not dropped:
                raise SourceError(f"{self._label}: the blob sent again is shorter than the "
                                  f"{self._offset} bytes already received")
            self._skip -= len(dropped)

    def _resume(self, error: _ReadFailed) -> None:
        self._body.close()
        self._resumes += 1
        retries = self._client.options.retries
        if self._resumes > retries:
            raise error
        delay = self._client.backoff_delay(self._resumes, None)
        # The error message starts with the blob's label.
        log.warning("%s, after %d bytes (resume %d of %d); resuming in %.2fs",
                    error, self._offset, self._resumes, retries, delay)
        _sleep(delay)
        self._body = self._client._get(self._url, {"Range": f"bytes={self._offset}-"}, self._label,
                                       accept=(200, 206))
        self._skip = 0
        if self._body.response.status == 206 and self._range_matches():
            return
        if self._body.response.status == 206:
            content_range = self._body.response.getheader("Content-Range")
            log.warning("%s: the registry returned Content-Range %r for Range bytes=%d-; "
                        "reading the blob again from byte 0", self._label, content_range, self._offset)
            self._body.close()
            self._body = self._client._get(self._url, {}, self._label)
        else:
            log.warning("%s: the registry ignored the Range request; reading the blob again from byte 0",
                        self._label)
        self._skip = self._offset

    def _range_matches(self) -> bool:
        match = _CONTENT_RANGE.fullmatch((self._body.response.getheader("Content-Range") or "").strip())
        if match is None:
            return False
        first, last, total = match.groups()
        if int(first) != self._offset or int(last) < int(first):
            return False
        length = self._body.response.length
        return (total == "*" or int(last) == int(total) - 1) and \
            (length is None or length == int(last) - int(first) + 1)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Return the wait a Retry-After header requests, in seconds from ``now`` (a Unix time).

    The header is either whole seconds or an HTTP date. None means absent or
    invalid; a date in the past gives 0.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def docker_config_credentials(host: str) -> tuple[str, str] | None:
    """Return (username, password) for ``host`` from the Docker client config, or None.

    Reads ``$DOCKER_CONFIG/config.json``, or ``~/.docker/config.json``, and the
    base64 ``auth`` field of the ``auths`` entry for ``host`` (also written as
    ``https://host`` or ``http://host``, with or without a path). Credential
    helpers and identity tokens are not used.
    """
    directory = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    path = Path(directory) / "config.json"
    try:
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring the Docker config %s: %s", path, exc)
        return None
    auths = document.get("auths") if isinstance(document, dict) else None
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("auth"), str):
            continue
        entry_host = urllib.parse.urlsplit(key if "://" in key else "//" + key).netloc
        if entry_host.lower() != host.lower():
            continue
        try:
            pair = base64.b64decode(entry["auth"], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            log.warning("ignoring the Docker config entry for %s in %s: the auth field is not "
                        "base64 of USER:PASSWORD", key, path)
            continue
        username, colon, password = pair.partition(":")
        if colon and username:
            log.info("using the credentials for %s from %s", host, path)
            return username, password
    return None


class RegistryClient:
    """Fetches manifests and blobs of one repository."""

    def __init__(self, host: str, repository: str, options: RegistryOptions):
        self.host = host
        self.repository = repository
        self.options = options
        hostname = urllib.parse.urlsplit("//" + host).hostname or ""
        if options.plain_http and not is_loopback_host(hostname):
            raise UsageError(f"--plain-http is allowed only for loopback registries "
                             f"(127.0.0.0/8, ::1, localhost), not {host!r}; use HTTPS")
        self.base_url = f"{'http' if options.plain_http else 'https'}://{host}"
        self._origin = _origin(self.base_url)
        self._authorization: str | None = None
        self._ssl_context = ssl.create_default_context()
        self._username, self._password = options.username, options.password
        if self._username is None and options.docker_config:
            self._username, self._password = docker_config_credentials(host) or (None, None)

    def get_manifest(self, reference: str) -> tuple[bytes, str | None, str | None]:
        """Return (bytes, Content-Type, Docker-Content-Digest) of a manifest by tag or digest."""
        label = f"manifest {self.host}/{self.repository}:{reference}" if ":" not in reference \
            else f"manifest {self.host}/{self.repository}@{reference}"
        url = f"{self.base_url}/v2/{self.repository}/manifests/{reference}"
        with self._get(url, {"Accept": mediatypes.MANIFEST_ACCEPT}, label) as body:
            data = body.read(MAX_MANIFEST_BYTES + 1)
            content_type = body.response.getheader("Content-Type")
            digest = body.response.getheader("Docker-Content-Digest")
        if len(data) > MAX_MANIFEST_BYTES:
            raise ImageError(f"{label} is larger than the {MAX_MANIFEST_BYTES} bytes allowed")
        if content_type is not None:
            content_type = content_type.split(";", 1)[0].strip()
        return data, content_type, digest

    def open_blob(self, digest: str) -> BinaryIO:
        """Open a blob for streaming, following redirects (for example to object storage).

        A body that breaks off is resumed where it stopped (see ``_BlobStream``).
        """
        url = f"{self.base_url}/v2/{self.repository}/blobs/{digest}"
        return _BlobStream(self, url, f"blob {digest} of {self.host}/{self.repository}")

    def backoff_delay(self, attempt: int, retry_after: float | None) -> float:
        """Return the wait before retry ``attempt`` (from 1): full jitter, at least Retry-After."""
        ceiling = min(MAX_BACKOFF_S, self.options.backoff_base_s * 2 ** (attempt - 1))
        delay = random.uniform(0, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        return delay

    # -- requests ------------------------------------------------------------

    def _get(self, url: str, headers: dict[str, str], label: str, accept: tuple[int, ...] = (200,)) -> _Body:
        """GET a registry URL with authentication and retries; return a body with a status in ``accept``.

        A 401 fetches new credentials and repeats the request once, both for
        the first request and for one whose token has expired during the run.
        """
        body = self._get_with_retries(url, headers, label)
        if body.response.status == 401:
            challenge = body.response.getheader("WWW-Authenticate") or ""
            body.close()
            if self._authorization is not None:
                log.info("%s: the registry rejected the current credentials (HTTP 401); "
                         "authenticating again", label)
            self._authenticate(challenge, label)
            body = self._get_with_retries(url, headers, label)
        status = body.response.status
        if status in accept:
            return body
        reason = body.response.reason
        body.close()
        if status in (401, 403):
            hint = "" if self._username else "; pass --username and --password-stdin"
            raise SourceError(f"{label}: access denied (HTTP {status} {reason}){hint}")
        if status == 404:
            raise SourceError(f"{label}: not found in the registry (HTTP 404)")
        raise SourceError(f"{label}: the registry returned HTTP {status} {reason}")

    def _get_with_retries(self, url: str, headers: dict[str, str], label: str) -> _Body:
        attempt = 1
        while True:
            retry_after = None
            try:
                body = self._get_following_redirects(url, headers, label)
            except (OSError, http.client.HTTPException) as exc:
                if attempt >= self.options.attempts:
                    raise SourceError(f"{label}: request to {url} failed after {attempt} attempts: {exc}") from None
                reason = repr(exc)
            else:
                status = body.response.status
                if status not in _RETRY_STATUSES or attempt >= self.options.attempts:
                    return body
                retry_after = parse_retry_after(body.response.getheader("Retry-After"), time.time())
                body.close()
                reason = f"HTTP {status}"
            delay = self.backoff_delay(attempt, retry_after)
            log.warning("%s: %s (attempt %d of %d), retrying in %.2fs",
                        label, reason, attempt, self.options.attempts, delay)
            _sleep(delay)
            attempt += 1

    def _get_following_redirects(self, url: str, headers: dict[str, str], label: str) -> _Body:
        for _hop in range(MAX_REDIRECTS + 1):
            self._check_url(url, label)
            request_headers = {"User-Agent": f"lazyfs-index/{__version__}", **headers}
            # Credentials go to the registry's own origin only, never to a
            # redirect target elsewhere (a storage URL that carries its own signature).
            if self._authorization and _origin(url) == self._origin:
                request_headers["Authorization"] = self._authorization
            body = self._send(url, request_headers, label)
            if body.response.status not in _REDIRECT_STATUSES:
                return body
            location = body.response.getheader("Location")
            body.close()
            if not location:
                raise SourceError(f"{label}: redirect from {url} without a Location header")
            url = urllib.parse.urljoin(url, location)
        raise SourceError(f"{label}: more than {MAX_REDIRECTS} redirects, last to {url}")

    def _send(self, url: str, headers: dict[str, str], label: str) -> _Body:
        parts = urllib.parse.urlsplit(url)
        timeout = self.options.timeout_s
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                                     context=self._ssl_context)
        else:
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        deadline = time.monotonic() + timeout
        try:
            connection.request("GET", target, headers=headers)
            response = connection.getresponse()
        except BaseException:
            connection.close()
            raise
        log.debug("GET %s -> %d", url, response.status)
        return _Body(connection, response, label, deadline, timeout)

    def _check_url(self, url: str, label: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "https" and parts.hostname:
            return
        if parts.scheme == "http" and parts.hostname and self.options.plain_http \
                and is_loopback_host(parts.hostname):
            return
        raise SourceError(f"{label}: refusing to fetch {url}: only HTTPS, or plain HTTP to a "
                          "loopback host with --plain-http, is allowed")

    # -- authentication --------------------------------------------------------

    def _authenticate(self, challenge: str, label: str) -> None:
        scheme, params = parse_challenge(challenge)
        if scheme == "bearer":
            self._authorization = "Bearer " + self._fetch_token(params, label)
        elif scheme == "basic":
            if not self._username:
                raise SourceError(f"{label}: the registry requires a login; pass --username and --password-stdin")
            self._authorization = self._basic_credentials()
        else:
            raise SourceError(f"{label}: unsupported authentication challenge {challenge!r}")

    def _basic_credentials(self) -> str:
        pair = f"{self._username}:{self._password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    def _fetch_token(self, params: dict[str, str], label: str) -> str:
        realm = params.get("realm")
        if not realm:
            raise SourceError(f"{label}: Bearer challenge without a realm")
        query = []
        if params.get("service"):
            query.append(("service", params["service"]))
        scopes = (params.get("scope") or f"repository:{self.repository}:pull").split(" ")
        query.extend(("scope", scope) for scope in scopes if scope)
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        credentials = self._basic_credentials() if self._username else ""
        self._check_url(url, label)
        # The token request carries the basic credentials to the realm itself only.
        body = self._send(url, {"User-Agent": f"lazyfs-index/{__version__}",
                                **({"Authorization": credentials} if credentials else {})}, label)
        with body:
            status = body.response.status
            data = body.read(MAX_TOKEN_RESPONSE_BYTES + 1)
        if status in (401, 403):
            raise SourceError(f"{label}: token server {realm} rejected the credentials (HTTP {status})")
        if status != 200:
            raise SourceError(f"{label}: token server {realm} returned HTTP {status}")
        try:
            document = json.loads(data)
        except ValueError:
            raise SourceError(f"{label}: token server {realm} returned invalid JSON") from None
        token = document.get("token") or document.get("access_token") if isinstance(document, dict) else None
        if not isinstance(token, str) or not token:
            raise SourceError(f"{label}: token server {realm} returned no token")
        return token


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


class RegistrySource(Source):
    """An image in a registry: ``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]``."""

    def __init__(self, host: str, repository: str, tag: str | None, digest: str | None,
                 options: RegistryOptions):
        self.client = RegistryClient(host, repository, options)
        self.host = host
        self.repository = repository
        self.tag = tag
        self.digest = digest
        name = f"{host}/{repository}"
        self.label = f"docker://{name}" + (f"@{digest}" if digest else f":{tag}")
        self.names = [f"{name}:{tag}" if tag else f"{name}@{digest}"]

    @classmethod
    def from_reference(cls, text: str, options: RegistryOptions) -> "RegistrySource":
        """Parse ``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]``; the tag defaults to "latest"."""
        usage = f"invalid source {text!r}: expected docker://HOST[:PORT]/REPO[:TAG|@DIGEST]"
        host, slash, path = text.removeprefix("docker://").partition("/")
        if not slash or not host or not path:
            raise UsageError(usage)
        try:
            parts = urllib.parse.urlsplit("//" + host)
            valid_host = bool(parts.hostname) and parts.port != 0 and not parts.username \
                and parts.path == "" and not parts.query
        except ValueError:
            valid_host = False
        if not valid_host:
            raise UsageError(f"{usage}: invalid host {host!r}")
        path, digest = split_digest_suffix(path)
        repository, tag = path, None
        head, colon, suffix = path.rpartition(":")
        if colon and "/" not in suffix:
            if not TAG.fullmatch(suffix):
                raise UsageError(f"{usage}: invalid tag {suffix!r}")
            repository, tag = head, suffix
        if not _REPOSITORY.fullmatch(repository):
            raise UsageError(f"{usage}: invalid repository {repository!r} (lower-case letters, "
                             "digits and separators)")
        if digest is not None:
            try:
                check_digest(digest, "source")
            except ImageError as exc:
                raise UsageError(str(exc)) from None
        elif tag is None:
            tag = "latest"
        return cls(host, repository, tag, digest, options)

    def resolve(self) -> RootDocument:
        reference = self.digest or self.tag
        data, content_type, header_digest = self.client.get_manifest(reference)
        if self.digest is not None:
            verify_bytes(data, self.digest, None, f"manifest {self.digest}")
            return RootDocument(content_type, self.digest, data)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
            raise IntegrityError(f"manifest {self.label}: content has digest {digest}, but the registry "
                                 f"sent Docker-Content-Digest {header_digest}")
        return RootDocument(content_type, digest, data)

    def read_manifest(self, descriptor: Descriptor) -> bytes:
        data, _content_type, _digest = self.client.get_manifest(descriptor.digest)
        return data

    def open_blob(self, descriptor: Descriptor) -> BinaryIO:
        return self.client.open_blob(descriptor.digest)
