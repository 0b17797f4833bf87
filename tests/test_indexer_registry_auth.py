"""Bearer-token authentication against a real registry that requires it.

The test starts its own docker-registry with ``auth: token`` and a token
server on 127.0.0.1 (``http.server`` in a thread). The token server signs
JWTs with a throw-away RSA key whose self-signed certificate is the
registry's ``rootcertbundle``, and sends the certificate in the ``x5c``
header, which distribution 2.8 verifies against that bundle. Anonymous
requests get pull access; the user "alice" with password "secret" gets pull
and push.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from lazyfs.store import open_store
from tests.support import oci
from tests.support.net import LOOPBACK, free_port, wait_for_port
from tests.support.oci import Layer, file

SERVICE = "lazyfs-test-registry"
ISSUER = "lazyfs-test-token-server"
USER, PASSWORD = "alice", "secret"
REPOSITORY = "lazyfs/private"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues registry tokens; records the requests it received."""

    def __init__(self, key: rsa.RSAPrivateKey, certificate: x509.Certificate):
        self.key = key
        self.certificate_der = certificate.public_bytes(serialization.Encoding.DER)
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.handle(self)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def realm(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/token"

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
        authorization = request.headers.get("Authorization")
        self.requests.append({"query": query, "authorization": authorization})
        user = None
        if authorization is not None:
            expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            if authorization != expected:
                request.send_response(401)
                request.end_headers()
                return
            user = USER
        access = []
        for scope in query.get("scope", []):
            kind, name, actions = scope.split(":")
            allowed = [a for a in actions.split(",") if a == "pull" or (a == "push" and user)]
            access.append({"type": kind, "name": name, "actions": allowed})
        body = json.dumps({"token": self.sign(user or "", access)}).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def sign(self, subject: str, access: list[dict]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.certificate_der).decode()]}
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + 600, "nbf": now - 60,
                  "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"


def _self_signed(key: rsa.RSAPrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
    now = time.time()
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime.fromtimestamp(now - 3600, datetime.timezone.utc))
            .not_valid_after(datetime.datetime.fromtimestamp(now + 86400, datetime.timezone.utc))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    """(registry host, token server) with an image pushed as lazyfs/private:v1."""
    if shutil.which("docker-registry") is None or shutil.which("skopeo") is None:
        pytest.skip("docker-registry or skopeo is missing (run scripts/install-deps)")
    work = tmp_path_factory.mktemp("token-registry")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    certificate = _self_signed(key)
    (work / "root.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    tokens = TokenServer(key, certificate)
    tokens.thread.start()

    port = free_port()
    (work / "storage").mkdir()
    (work / "config.yml").write_text(f"""\
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {work / 'storage'}
http:
  addr: {LOOPBACK}:{port}
auth:
  token:
    realm: {tokens.realm}
    service: {SERVICE}
    issuer: {ISSUER}
    rootcertbundle: {work / 'root.pem'}
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    with open(work / "registry.log", "wb") as log_file:
        process = subprocess.Popen(["docker-registry", "serve", str(work / "config.yml")], env=env,
                                   stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
    try:
        wait_for_port(LOOPBACK, port, 30.0, proc=process, stderr_path=work / "registry.log")
        host = f"{LOOPBACK}:{port}"
        image = oci.write_image(work / "layout", [Layer([file("secret.txt", b"only with a token\n")])], tag="v1")
        _push(work, image, host)
        tokens.requests.clear()
        yield host, tokens, image
    finally:
        process.terminate()
        process.wait(timeout=10)
        tokens.httpd.shutdown()
        tokens.httpd.server_close()


def _push(work: Path, image: oci.Image, host: str) -> None:
    (work / "policy.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    (work / "registries.conf").write_text("")
    command = ["skopeo", "--policy", str(work / "policy.json"), "copy", "--quiet", "--preserve-digests",
               "--dest-tls-verify=false", "--dest-creds", f"{USER}:{PASSWORD}",
               f"oci:{image.layout}:v1", f"docker://{host}/{REPOSITORY}:v1"]
    env = dict(os.environ, CONTAINERS_REGISTRIES_CONF=str(work / "registries.conf"))
    result = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")


def test_anonymous_bearer_token(token_registry, tmp_path):
    host, tokens, image = token_registry

    run = oci.run_indexer("--store", (tmp_path / "store").as_uri(), "--plain-http", "--json",
                          f"docker://{host}/{REPOSITORY}:v1")

    assert run.code == 0, run.stderr
    assert run.result["manifest_digest"] == image.manifest_digest
    assert tokens.requests[0] == {"query": {"service": [SERVICE], "scope": [f"repository:{REPOSITORY}:pull"]},
                                  "authorization": None}
    # One token serves the manifest, the config and the layer.
    assert len(tokens.requests) == 1
    tree = oci.TreeView(open_store((tmp_path / "store").as_uri()), image.manifest_digest)
    assert tree.read(b"secret.txt") == b"only with a token\n"


def test_bearer_token_with_password_from_stdin(token_registry, tmp_path, monkeypatch):
    host, tokens, image = token_registry
    tokens.requests.clear()
    monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n"))

    run = oci.run_indexer("--store", (tmp_path / "store").as_uri(), "--plain-http", "--json",
                          "--username", USER, "--password-stdin", f"docker://{host}/{REPOSITORY}:v1")

    assert run.code == 0, run.stderr
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert [request["authorization"] for request in tokens.requests] == [expected]


def test_wrong_password_is_rejected_by_token_server(token_registry, tmp_path, monkeypatch):
    host, tokens, _image = token_registry
    monkeypatch.setattr(sys, "stdin", io.StringIO("wrong\n"))

    run = oci.run_indexer("--store", (tmp_path / "store").as_uri(), "--plain-http",
                          "--username", USER, "--password-stdin", f"docker://{host}/{REPOSITORY}:v1")

    assert run.code == 4
    assert run.stderr == (f"lazyfs-index: error: manifest {host}/{REPOSITORY}:v1: token server "
                          f"{tokens.realm} rejected the credentials (HTTP 401)\n")
    assert PASSWORD not in run.stderr


def test_token_the_registry_rejects_is_access_denied(token_registry, tmp_path, monkeypatch):
    host, tokens, _image = token_registry
    monkeypatch.setattr(tokens, "sign", lambda subject, access: "not.a.token")

    run = oci.run_indexer("--store", (tmp_path / "store").as_uri(), "--plain-http",
                          f"docker://{host}/{REPOSITORY}:v1")

    assert run.code == 4
    assert run.stderr == (f"lazyfs-index: error: manifest {host}/{REPOSITORY}:v1: access denied "
                          "(HTTP 401 Unauthorized); pass --username and --password-stdin\n")
