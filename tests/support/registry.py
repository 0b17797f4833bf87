"""A real OCI registry on loopback: Debian's docker-registry (CNCF distribution).

The registry runs with a generated config: filesystem storage in a temporary
directory, plain HTTP on 127.0.0.1, no authentication, and deletes enabled.
Images are pushed from OCI image layouts with skopeo, isolated from the host's
container configuration (its own trust policy, empty registries.conf, no
credentials).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .net import LOOPBACK, ServerStartError, free_port, stderr_tail, wait_for_port

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
PUSH_TIMEOUT_S = 600.0

# docker-registry reads REGISTRY_* variables as overrides of its config file.
_REGISTRY_ENV_PREFIX = "REGISTRY_"

_CONFIG_TEMPLATE = """\
version: 0.1
log:
  level: info
  fields:
    service: registry
storage:
  filesystem:
    rootdirectory: {storage_dir}
  delete:
    enabled: true
http:
  addr: {addr}
  headers:
    X-Content-Type-Options: [nosniff]
"""

_ACCEPT_POLICY = {"default": [{"type": "insecureAcceptAnything"}]}


class RegistryError(RuntimeError):
    """The registry or a push to it failed."""


class Registry:
    """A docker-registry process on 127.0.0.1, started on ``__enter__``.

    ``host`` is ``"127.0.0.1:PORT"``, the form image references use.
    """

    def __init__(self, binary: str = "docker-registry") -> None:
        self.binary = binary
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._work_dir: tempfile.TemporaryDirectory | None = None
        self.stderr_path: Path | None = None

    @property
    def host(self) -> str:
        if self.port is None:
            raise RuntimeError("Registry has no port yet: enter the context first")
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def __enter__(self) -> Registry:
        self._work_dir = tempfile.TemporaryDirectory(prefix="lazyfs-registry-")
        work = Path(self._work_dir.name)
        try:
            self._start(work)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("registry %d did not exit after SIGTERM, sending SIGKILL", proc.pid)
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
            log.info("registry at %s stopped", self.host)
        self._proc = None
        if self._work_dir is not None:
            self._work_dir.cleanup()
            self._work_dir = None

    def push(self, oci_layout_dir: Path, tag: str, repository: str, ref_tag: str,
             all_platforms: bool = False) -> str:
        """Push ``oci_layout_dir:tag`` to ``HOST/repository:ref_tag`` and return its digest.

        ``--preserve-digests`` makes skopeo fail rather than rewrite the
        manifest, so the returned manifest digest equals the one in the layout.
        Of an image index skopeo pushes only the host's image unless
        ``all_platforms`` is set.
        """
        work = Path(self._work_dir.name)
        digest_file = work / f"push-{time.monotonic_ns()}.digest"
        command = [
            "skopeo",
            "--policy", str(work / "policy.json"),
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
            "--dest-no-creds",
            "--digestfile", str(digest_file),
            *(["--all"] if all_platforms else []),
            f"oci:{oci_layout_dir}:{tag}",
            f"docker://{self.host}/{repository}:{ref_tag}",
        ]
        env = dict(os.environ, CONTAINERS_REGISTRIES_CONF=str(work / "registries.conf"))
        result = subprocess.run(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=PUSH_TIMEOUT_S,
        )
        if result.returncode != 0:
            raise RegistryError(
                f"skopeo copy failed with exit code {result.returncode}: {' '.join(command)}\n"
                f"{result.stderr.decode(errors='replace')}"
            )
        digest = digest_file.read_text().strip()
        digest_file.unlink()
        return digest

    def _start(self, work: Path) -> None:
        storage_dir = work / "storage"
        storage_dir.mkdir()
        (work / "policy.json").write_text(json.dumps(_ACCEPT_POLICY))
        (work / "registries.conf").write_text("")
        self.stderr_path = work / "registry.log"

        self.port = free_port()
        config_path = work / "config.yml"
        config_path.write_text(
            _CONFIG_TEMPLATE.format(storage_dir=storage_dir, addr=self.host)
        )

        binary = shutil.which(self.binary)
        if binary is None:
            raise RegistryError(
                f"{self.binary} not found on PATH. Install the Debian package docker-registry."
            )
        env = {k: v for k, v in os.environ.items() if not k.startswith(_REGISTRY_ENV_PREFIX)}
        with open(self.stderr_path, "ab") as log_file:
            self._proc = subprocess.Popen(
                [binary, "serve", str(config_path)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        wait_for_port(
            LOOPBACK,
            self.port,
            deadline - time.monotonic(),
            proc=self._proc,
            stderr_path=self.stderr_path,
        )
        self._wait_for_api(deadline)
        log.info("registry %d listening at %s", self._proc.pid, self.url)

    def _wait_for_api(self, deadline: float) -> None:
        """Poll GET /v2/ until it returns 200."""
        url = f"{self.url}/v2/"
        delay_s = 0.01
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2.0) as response:
                    if response.status == 200:
                        return
                    last_error = f"HTTP {response.status}"
            except urllib.error.HTTPError as error:
                last_error = f"HTTP {error.code}"
            except OSError as error:
                last_error = str(error)
            if self._proc.poll() is not None or time.monotonic() >= deadline:
                raise ServerStartError(
                    f"registry at {self.url} did not return 200 for GET /v2/ "
                    f"(last result: {last_error}){stderr_tail(self._proc, self.stderr_path)}"
                )
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.2)
