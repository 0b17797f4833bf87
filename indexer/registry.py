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

Every request has a timeout. Connection failures and 429 or 5xx responses are
retried a few times with jittered backoff before the body starts. A body that
breaks off midway fails the run.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import logging
import random
import re
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from typing import BinaryIO

from .. import __version__
from . import mediatypes
from ..errors import IntegrityError
from .errors import ImageError, SourceError, UsageError
from .manifest import MAX_MANIFEST_BYTES, Descriptor
from .source import TAG, RootDocument, Source, split_digest_suffix
from .verify import check_digest, verify_bytes

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MAX_TOKEN_RESPONSE_BYTES = 1 << 20
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
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
    attempts: int = 3
    backoff_base_s: float = 0.5


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


class _Body:
    """A response body stream that owns its connection and reports read failures as SourceError."""

    def __init__(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse,
                 label: str):
        self._connection = connection
        self.response = response
        self._label = label

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.response.read(None if size is None or size < 0 else size)
        except (OSError, http.client.HTTPException) as exc:
            raise SourceError(f"{self._label}: reading the response failed: {exc!r}") from None
        # http.client returns b"" when the connection closes before
        # Content-Length is reached, leaving the missing count in ``length``.
        if not data and size != 0 and self.response.length:
            raise SourceError(f"{self._label}: the connection closed with {self.response.length} bytes "
                              "of the response missing")
        return data

    def close(self) -> None:
        self.response.close()
        self._connection.close()

    def __enter__(self) -> "_Body":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


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
        """Open a blob for streaming, following redirects (for example to object storage)."""
        # NOTE: a connection that drops mid-blob fails the run; there is no
        # resume with a Range request.
        url = f"{self.base_url}/v2/{self.repository}/blobs/{digest}"
        return self._get(url, {}, f"blob {digest} of {self.host}/{self.repository}")

    # -- requests ------------------------------------------------------------

    def _get(self, url: str, headers: dict[str, str], label: str) -> _Body:
        """GET a registry URL with authentication and retries; return the 200 response body."""
        body = self._get_with_retries(url, headers, label)
        if body.response.status == 401:
            challenge = body.response.getheader("WWW-Authenticate") or ""
            body.close()
            self._authenticate(challenge, label)
            body = self._get_with_retries(url, headers, label)
        status = body.response.status
        if status == 200:
            return body
        reason = body.response.reason
        body.close()
        if status in (401, 403):
            hint = "" if self.options.username else "; pass --username and --password-stdin"
            raise SourceError(f"{label}: access denied (HTTP {status} {reason}){hint}")
        if status == 404:
            raise SourceError(f"{label}: not found in the registry (HTTP 404)")
        raise SourceError(f"{label}: the registry returned HTTP {status} {reason}")

    def _get_with_retries(self, url: str, headers: dict[str, str], label: str) -> _Body:
        attempt = 1
        while True:
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
                body.close()
                reason = f"HTTP {status}"
            delay = random.uniform(0, self.options.backoff_base_s * 2 ** (attempt - 1))
            log.warning("%s: %s (attempt %d of %d), retrying in %.2fs",
                        label, reason, attempt, self.options.attempts, delay)
            time.sleep(delay)
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
        try:
            connection.request("GET", target, headers=headers)
            response = connection.getresponse()
        except BaseException:
            connection.close()
            raise
        log.debug("GET %s -> %d", url, response.status)
        return _Body(connection, response, label)

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
            if not self.options.username:
                raise SourceError(f"{label}: the registry requires a login; pass --username and --password-stdin")
            self._authorization = self._basic_credentials()
        else:
            raise SourceError(f"{label}: unsupported authentication challenge {challenge!r}")

    def _basic_credentials(self) -> str:
        pair = f"{self.options.username}:{self.options.password or ''}".encode()
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
        credentials = self._basic_credentials() if self.options.username else ""
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
