"""A real S3 endpoint on loopback: the moto server as a subprocess.

Code under test talks to it with plain boto3 and ``endpoint_url``, exactly as it
would talk to any S3-compatible service.

Two ways to make the store unreachable, for tests that prove no request reaches it:

- ``stop()`` / ``start()`` end the process and start a new one on the same port.
  moto keeps all state in memory, so a restart loses every bucket and object.
  While stopped, connections are refused.
- ``pause()`` / ``resume()`` send SIGSTOP / SIGCONT. State survives. While paused,
  the kernel still accepts TCP connections into the listen backlog, but the
  server sends no response, so clients run into their read timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import botocore.config

from .net import LOOPBACK, ServerStartError, free_port, stderr_tail, wait_for_port

log = logging.getLogger(__name__)

REGION = "us-east-1"
ACCESS_KEY_ID = "testing"
SECRET_ACCESS_KEY = "testing"

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class MotoServer:
    """A moto S3 server on 127.0.0.1, started on ``__enter__`` and stopped on ``__exit__``.

    ``port`` defaults to a free port chosen at the first start and kept for
    restarts, so ``endpoint_url`` stays valid across ``stop()`` and ``start()``.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port
        self._proc: subprocess.Popen | None = None
        self._paused = False
        self._log_dir = tempfile.TemporaryDirectory(prefix="lazyfs-moto-")
        self.stderr_path = Path(self._log_dir.name) / "moto-server.log"

    @property
    def endpoint_url(self) -> str:
        if self.port is None:
            raise RuntimeError("MotoServer has no port yet: call start() first")
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        self._log_dir.cleanup()

    def start(self) -> None:
        """Start the server and block until it responds to HTTP requests.

        Raises ServerStartError if it exits or does not respond within
        START_TIMEOUT_S seconds.
        """
        if self.running:
            raise RuntimeError(f"moto server is already running at {self.endpoint_url}")
        if self.port is None:
            self.port = free_port()
        command = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)]
        with open(self.stderr_path, "ab") as stderr_file:
            self._proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=stderr_file, stderr=stderr_file
            )
        self._paused = False
        try:
            self._wait_until_answering(time.monotonic() + START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        log.info("moto server %d listening at %s", self._proc.pid, self.endpoint_url)

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after STOP_TIMEOUT_S seconds.

        All buckets and objects are lost. Does nothing if the server is not running.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            if self._paused:
                # A stopped process handles SIGTERM only once it runs again.
                os.kill(proc.pid, signal.SIGCONT)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("moto server %d did not exit after SIGTERM, sending SIGKILL", proc.pid)
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        self._proc = None
        self._paused = False
        log.info("moto server at %s stopped", self.endpoint_url)

    def pause(self) -> None:
        """Freeze the server with SIGSTOP. Requests hang until ``resume()``."""
        if not self.running:
            raise RuntimeError("moto server is not running, so it cannot be paused")
        os.kill(self._proc.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Continue a paused server with SIGCONT."""
        if not self.running:
            raise RuntimeError("moto server is not running, so it cannot be resumed")
        os.kill(self._proc.pid, signal.SIGCONT)
        self._paused = False

    def client(self, **config: object):
        """Return a boto3 S3 client for this server with the test credentials.

        Keyword arguments go to ``botocore.config.Config`` (for example
        ``read_timeout=1, retries={"total_max_attempts": 1}``).
        """
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
            config=botocore.config.Config(**config),
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` and return its name."""
        self.client().create_bucket(Bucket=name)
        return name

    def _wait_until_answering(self, deadline: float) -> None:
        wait_for_port(
            LOOPBACK,
            self.port,
            deadline - time.monotonic(),
            proc=self._proc,
            stderr_path=self.stderr_path,
        )
        # The port can accept connections before the WSGI app is ready, so wait
        # for an HTTP response too. Any status code counts.
        url = f"{self.endpoint_url}/moto-api/"
        delay_s = 0.01
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2.0):
                    return
            except urllib.error.HTTPError:
                return
            except OSError as error:
                last_error = error
            if self._proc.poll() is not None or time.monotonic() >= deadline:
                raise ServerStartError(
                    f"moto server at {self.endpoint_url} did not respond to HTTP requests "
                    f"(last error: {last_error}){stderr_tail(self._proc, self.stderr_path)}"
                )
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.2)
