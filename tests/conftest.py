"""Shared fixtures: real servers on loopback, the cached test image, marker skips.

Markers (declared in pyproject.toml):

- ``fuse``: skipped only when /dev/fuse or fusermount3 is missing.
- ``runc``: skipped when runc is missing or the tests do not run as root.
- ``image``: for tests that use the ``debootstrap_image`` fixture, which builds
  the image once per machine (about a minute) and skips where it cannot be built.
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import images
from tests.support.registry import Registry
from tests.support.s3server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, MotoServer


def fuse_unavailable_reason() -> str | None:
    """Return why FUSE mounts cannot work here, or None if they can."""
    try:
        if not stat.S_ISCHR(os.stat("/dev/fuse").st_mode):
            return "/dev/fuse is not a character device"
    except FileNotFoundError:
        return "/dev/fuse is missing (load the fuse kernel module)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (install the Debian package fuse3)"
    return None


def runc_unavailable_reason() -> str | None:
    """Return why runc containers cannot start here, or None if they can."""
    if shutil.which("runc") is None:
        return "runc is missing (install the Debian package runc)"
    if os.geteuid() != 0:
        return "runc tests need root"
    return None


def image_unavailable_reason() -> str | None:
    """Return why the debootstrap test image cannot be built here, or None if it can."""
    for tool in ("debootstrap", "umoci"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (run scripts/install-deps)"
    if os.geteuid() != 0:
        return "building the test image needs root"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    checks = {"fuse": fuse_unavailable_reason, "runc": runc_unavailable_reason}
    for marker, unavailable_reason in checks.items():
        if item.get_closest_marker(marker) is None:
            continue
        reason = unavailable_reason()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def _isolated_aws_environment() -> Iterator[None]:
    """Give boto3 test credentials and keep the host's AWS profile out of every test.

    Without this, boto3 would read the ~/.aws files and AWS_* variables of the
    user running the tests, and could look for credentials at the EC2 metadata
    address.
    """
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                patch.delenv(name)
        patch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
        patch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
        patch.setenv("AWS_DEFAULT_REGION", REGION)
        patch.setenv("AWS_CONFIG_FILE", os.devnull)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


@pytest.fixture(scope="session")
def s3_server(_isolated_aws_environment: None) -> Iterator[MotoServer]:
    """A moto S3 server for the whole session, at ``s3_server.endpoint_url``.

    AWS_ENDPOINT_URL_S3 points at it too, so a boto3 client created without an
    endpoint URL reaches this server and never a real AWS endpoint. Tests must
    not stop or pause this shared server: they start their own MotoServer for that.
    """
    with MotoServer() as server, pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint_url)
        yield server


@pytest.fixture
def s3_bucket(s3_server: MotoServer) -> str:
    """Name of a new, empty bucket on the session's moto server."""
    return s3_server.create_bucket(f"lazyfs-test-{uuid.uuid4().hex[:16]}")


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    """A docker-registry on 127.0.0.1 for the whole session, at ``registry.host`` (HOST:PORT)."""
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is missing (run scripts/install-deps)")
    with Registry() as server:
        yield server


@pytest.fixture(scope="session")
def debootstrap_image() -> tuple[Path, str]:
    """``(layout_dir, tag)`` of the cached two-layer Debian bookworm + python3 OCI image."""
    reason = image_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return images.debootstrap_image()


@pytest.fixture(scope="session")
def tools_image() -> tuple[Path, str]:
    """``(layout_dir, tag)`` of the cached three-layer Debian image with ping, sudo and perl."""
    reason = image_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return images.tools_image()
