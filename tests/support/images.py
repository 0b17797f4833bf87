"""Build and cache Debian OCI images for tests.

Each image is Debian bookworm built with debootstrap and packed with umoci into an
OCI image layout. The python3 image (``debootstrap_image``) has two layers:

- layer 1: ``debootstrap --variant=minbase bookworm``.
- layer 2: the difference to the same bootstrap with ``--include=python3``. It
  adds python3 and replaces files that package setup rewrote (dpkg status,
  ld.so.cache, directory times). It has no whiteouts, because the second
  bootstrap installs a superset of the first one's packages.

Its config sets Cmd ``["/usr/bin/python3"]``, a standard PATH and WorkingDir ``/``.

The tools image (``tools_image``) has the same first layer, a second layer with
iputils-ping, libcap2-bin, sudo, passwd, perl and ca-certificates, and a third
layer that deletes /usr/share/doc and /usr/share/man, so it has whiteouts. After
the second bootstrap ``setcap cap_net_raw+ep`` runs on /usr/bin/ping in the
root filesystem, so the image has a file capability (a ``security.capability``
xattr) whatever order the packages were configured in. sudo, su and passwd are
setuid or setgid programs. Its config sets Cmd ``["/bin/bash"]``.

Each layout is built once per machine and cached outside the repository, under
``$LAZYFS_TEST_CACHE`` or ``/var/cache/lazyfs-tests``. A build runs in a
temporary directory next to the cache and is renamed into place only when
complete, under an ``fcntl`` lock, so concurrent pytest processes wait for one
build and a half-built image is never used.

Building needs root, network access to the Debian mirror that apt uses, and the
debootstrap and umoci tools. Measured on a 2-core Debian 12 machine with a fast
Debian mirror, a build of the python3 image took 58 to 68 s, and the layout is
69 MB (gzip layers of 51 MB and 18 MB). The tools image took 80 s, and its
layout is 69 MB too (gzip layers of 51 MB, 20 MB and 157 bytes).
``python -m tests.support.images`` builds both caches ahead of time and prints
``LAYOUT_DIR:TAG`` for each; ``python -m tests.support.images python3`` builds
and prints only the first.

``fat_image()`` builds a larger image for benchmarks, never for CI: layer 1 is
the same minbase bootstrap, and layer 2 is what ``apt-get install`` of python3,
python3-ipykernel, python3-numpy, python3-scipy, python3-pandas and
python3-matplotlib (without recommended packages) adds inside a chroot of
that bootstrap. Layer 2 has no whiteouts, because apt only adds and replaces
files there. The layout is 419 MB (gzip layers of 51 MB and 368 MB), and the
unpacked image has 52,916 entries, 46,881 of them regular files, with 1.29 GB
of file data. It is cached the same way under its own name.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("/var/cache/lazyfs-tests")
DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
TAG = "latest"

# Part of the cache directory name: change it whenever the recipe below changes,
# so that machines with an older cached image build the new one.
IMAGE_NAME = "debian-bookworm-python3-v1"
TOOLS_IMAGE_NAME = "debian-bookworm-tools-v1"

# The cache directory name of the fat benchmark image; change it with its recipe.
FAT_IMAGE_NAME = "debian-bookworm-fat-v1"
FAT_PACKAGES = (
    "python3",
    "python3-ipykernel",
    "python3-numpy",
    "python3-scipy",
    "python3-pandas",
    "python3-matplotlib",
)

IMAGE_ENV_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImageBuildError(RuntimeError):
    """A step of the test image build failed."""


@dataclass(frozen=True)
class Recipe:
    """How one cached test image is built on top of a minbase bootstrap.

    ``packages`` go into the second bootstrap (layer 2), ``capabilities`` are
    ``(path, setcap text)`` pairs applied after it, and ``removed`` paths are
    deleted in a third layer when there are any.
    """

    name: str
    packages: tuple[str, ...]
    cmd: str
    capabilities: tuple[tuple[str, str], ...] = ()
    removed: tuple[str, ...] = ()


PYTHON3_RECIPE = Recipe(IMAGE_NAME, packages=("python3",), cmd="/usr/bin/python3")
TOOLS_RECIPE = Recipe(
    TOOLS_IMAGE_NAME,
    packages=("iputils-ping", "libcap2-bin", "sudo", "passwd", "perl", "ca-certificates"),
    cmd="/bin/bash",
    capabilities=(("usr/bin/ping", "cap_net_raw+ep"),),
    removed=("usr/share/doc", "usr/share/man"),
)


def cache_dir() -> Path:
    """Return the directory for test artifacts kept between runs."""
    return Path(os.environ.get("LAZYFS_TEST_CACHE") or DEFAULT_CACHE_DIR)


def debootstrap_image() -> tuple[Path, str]:
    """Return ``(layout_dir, tag)`` of the cached python3 image, building it if missing.

    Raises ImageBuildError when a build step fails, with the tail of its output.
    """
    return cached_image(PYTHON3_RECIPE)


def tools_image() -> tuple[Path, str]:
    """Return ``(layout_dir, tag)`` of the cached tools image, building it if missing."""
    return cached_image(TOOLS_RECIPE)


def cached_image(recipe: Recipe) -> tuple[Path, str]:
    """Return ``(layout_dir, tag)`` of the image ``recipe`` builds, building it if missing.

    Raises ImageBuildError when a build step fails, with the tail of its output.
    """
    images_dir = cache_dir() / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    layout_dir = images_dir / recipe.name

    if _is_layout(layout_dir):
        return layout_dir, TAG

    with _exclusive_lock(images_dir / f".{recipe.name}.lock"):
        # Another process may have finished the build while this one waited.
        if _is_layout(layout_dir):
            return layout_dir, TAG
        _remove_stale_builds(images_dir, recipe.name)
        _build(images_dir, layout_dir, recipe)
    return layout_dir, TAG


def umoci_unpack(layout_dir: Path, tag: str, dest: Path) -> Path:
    """Unpack ``layout_dir:tag`` into the runtime bundle ``dest`` and return its rootfs.

    Run as root, umoci keeps the owners, modes and device nodes of the image.
    ``dest`` must not exist yet.
    """
    _run(["umoci", "unpack", "--image", f"{layout_dir}:{tag}", str(dest)])
    return dest / "rootfs"


def debian_mirror() -> str:
    """Return the Debian mirror URL that apt on this machine uses for bookworm.

    ``$LAZYFS_DEBIAN_MIRROR`` overrides it. Otherwise the first ``deb`` source for
    the ``bookworm`` suite in /etc/apt/sources.list, sources.list.d/*.list or
    sources.list.d/*.sources wins, and the default is deb.debian.org.
    """
    override = os.environ.get("LAZYFS_DEBIAN_MIRROR")
    if override:
        return override

    apt_dir = Path("/etc/apt")
    one_line_files = [apt_dir / "sources.list", *sorted(apt_dir.glob("sources.list.d/*.list"))]
    for path in one_line_files:
        mirror = _mirror_from_one_line_format(_read_text(path))
        if mirror:
            return mirror
    for path in sorted(apt_dir.glob("sources.list.d/*.sources")):
        mirror = _mirror_from_deb822_format(_read_text(path))
        if mirror:
            return mirror
    return DEFAULT_DEBIAN_MIRROR


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _mirror_from_one_line_format(text: str) -> str | None:
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        # Drop the "[arch=amd64 signed-by=...]" options block.
        line = re.sub(r"\[[^\]]*\]", " ", line)
        fields = line.split()
        if len(fields) >= 3 and fields[0] == "deb" and fields[2] == SUITE:
            return fields[1]
    return None


def _mirror_from_deb822_format(text: str) -> str | None:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        if SUITE not in fields.get("suites", "").split():
            continue
        uris = fields.get("uris", "").split()
        if uris:
            return uris[0]
    return None


def _is_layout(path: Path) -> bool:
    return (path / "index.json").is_file() and (path / "oci-layout").is_file()


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _build(images_dir: Path, layout_dir: Path, recipe: Recipe) -> None:
    mirror = debian_mirror()
    log.info("building test image %s from %s, which takes a minute or more", layout_dir, mirror)
    started = time.monotonic()
    build_dir = Path(tempfile.mkdtemp(prefix=f".build-{recipe.name}-", dir=images_dir))
    try:
        built_layout = _build_layout(build_dir, mirror, recipe)
        os.rename(built_layout, layout_dir)
    finally:
        _remove_tree(build_dir)
    log.info("built test image %s in %.0f s", layout_dir, time.monotonic() - started)


def _build_base_layer(build_dir: Path, mirror: str) -> tuple[Path, str, Path]:
    """Start a layout in ``build_dir`` with a minbase bootstrap as layer 1; return (layout, image, bundle).

    The bootstrap goes straight into the bundle's rootfs, and --refresh-bundle
    makes the next repack diff against this layer, not the empty image.
    """
    layout = build_dir / "layout"
    bundle = build_dir / "bundle"
    (build_dir / "debs").mkdir()
    image = f"{layout}:{TAG}"

    _run(["umoci", "init", "--layout", str(layout)])
    _run(["umoci", "new", "--image", image])
    _run(["umoci", "unpack", "--image", image, str(bundle)])
    _debootstrap(bundle / "rootfs", mirror, build_dir / "debs", build_dir / "debootstrap-base.log")
    _run(["umoci", "repack", "--refresh-bundle", "--image", image, str(bundle)])
    return layout, image, bundle


def _build_layout(build_dir: Path, mirror: str, recipe: Recipe) -> Path:
    layout, image, bundle = _build_base_layer(build_dir, mirror)
    rootfs = bundle / "rootfs"
    debs = build_dir / "debs"

    _empty_dir(rootfs)
    _debootstrap(
        rootfs, mirror, debs, build_dir / "debootstrap-packages.log", include=recipe.packages
    )
    for path, capability in recipe.capabilities:
        _run(["chroot", str(rootfs), "setcap", capability, "/" + path])
    # --refresh-bundle lets a third repack diff against this layer.
    refresh = ["--refresh-bundle"] if recipe.removed else []
    _run(["umoci", "repack", *refresh, "--image", image, str(bundle)])

    if recipe.removed:
        for path in recipe.removed:
            _remove_tree(rootfs / path)
        _run(["umoci", "repack", "--image", image, str(bundle)])

    _run(
        [
            "umoci", "config", "--image", image,
            "--config.cmd", recipe.cmd,
            "--config.env", IMAGE_ENV_PATH,
            "--config.workingdir", "/",
        ]
    )
    _run(["umoci", "gc", "--layout", str(layout)])
    _make_readable(layout)
    return layout


def _make_readable(layout: Path) -> None:
    # umoci writes blobs and index.json with mode 0600. The image is public test
    # data, so let tests and daemons that run as another user read it too.
    for path in [layout, *layout.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _debootstrap(
    rootfs: Path, mirror: str, debs: Path, log_path: Path, include: tuple[str, ...] = ()
) -> None:
    command = ["debootstrap", "--variant=minbase", f"--cache-dir={debs}"]
    if include:
        command.append("--include=" + ",".join(include))
    command += [SUITE, str(rootfs), mirror]
    _run(command, log_path=log_path)
    _strip_rootfs(rootfs)


def _strip_rootfs(rootfs: Path) -> None:
    """Remove package downloads, apt lists and host files that debootstrap copies in."""
    for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    for binary_cache in (rootfs / "var/cache/apt").glob("*.bin"):
        binary_cache.unlink()
    lists = rootfs / "var/lib/apt/lists"
    if lists.is_dir():
        _empty_dir(lists)
    # Container runtimes provide these files, so the build host's copies do
    # not belong in the image.
    for host_file in ("etc/resolv.conf", "etc/hostname"):
        (rootfs / host_file).unlink(missing_ok=True)


def _empty_dir(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            _remove_tree(child)
        else:
            child.unlink()


def _remove_stale_builds(images_dir: Path, name: str) -> None:
    # Only the lock holder builds, so any build directory left now is from a
    # process that died.
    for stale in images_dir.glob(f".build-{name}-*"):
        log.warning("removing unfinished test image build %s", stale)
        _remove_tree(stale)


def _remove_tree(path: Path) -> None:
    """Remove ``path`` without following mounts into the host.

    debootstrap mounts /proc and /sys inside its target while it runs, and a
    killed run can leave them mounted, so those are unmounted first and ``rm``
    stays on one file system.
    """
    for mount_point in sorted(_mount_points_under(path), reverse=True):
        subprocess.run(["umount", "--lazy", mount_point], check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def _mount_points_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    mount_points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            # Field 5 is the mount point, with spaces and tabs octal-escaped.
            mount_point = line.split()[4].encode().decode("unicode_escape")
            if mount_point.startswith(prefix):
                mount_points.append(mount_point)
    return mount_points


def _run(command: list[str], log_path: Path | None = None) -> None:
    """Run ``command`` and raise ImageBuildError with the tail of its output if it fails."""
    log.debug("running %s", command)
    if log_path is None:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output = result.stdout.decode(errors="replace")
    else:
        with open(log_path, "wb") as log_file:
            result = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT)
        output = log_path.read_text(errors="replace")
    if result.returncode != 0:
        tail = "\n".join(output.splitlines()[-30:])
        raise ImageBuildError(
            f"{command[0]} failed with exit code {result.returncode}: "
            f"{' '.join(command)}\n{tail}"
        )



def fat_image() -> tuple[Path, str]:
    """Return ``(layout_dir, tag)`` of the cached fat benchmark image, building it if missing.

    A build took 200 s on a 2-core machine with a fast Debian mirror. Raises
    ImageBuildError when a build step fails.
    """
    images_dir = cache_dir() / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    layout_dir = images_dir / FAT_IMAGE_NAME

    if _is_layout(layout_dir):
        return layout_dir, TAG

    with _exclusive_lock(images_dir / f".{FAT_IMAGE_NAME}.lock"):
        if _is_layout(layout_dir):
            return layout_dir, TAG
        for stale in images_dir.glob(f".build-{FAT_IMAGE_NAME}-*"):
            log.warning("removing unfinished test image build %s", stale)
            _remove_tree(stale)
        mirror = debian_mirror()
        log.info("building fat image %s from %s, which takes several minutes", layout_dir, mirror)
        started = time.monotonic()
        build_dir = Path(tempfile.mkdtemp(prefix=f".build-{FAT_IMAGE_NAME}-", dir=images_dir))
        try:
            built_layout = _build_fat_layout(build_dir, mirror)
            os.rename(built_layout, layout_dir)
        finally:
            _remove_tree(build_dir)
        log.info("built fat image %s in %.0f s", layout_dir, time.monotonic() - started)
    return layout_dir, TAG


def _build_fat_layout(build_dir: Path, mirror: str) -> Path:
    layout, image, bundle = _build_base_layer(build_dir, mirror)
    rootfs = bundle / "rootfs"

    _apt_get_install(rootfs, FAT_PACKAGES, build_dir / "apt-get.log")
    _strip_rootfs(rootfs)
    _run(["umoci", "repack", "--image", image, str(bundle)])

    _run(
        [
            "umoci", "config", "--image", image,
            "--config.cmd", "/usr/bin/python3",
            "--config.env", IMAGE_ENV_PATH,
            "--config.workingdir", "/",
        ]
    )
    _run(["umoci", "gc", "--layout", str(layout)])
    _make_readable(layout)
    return layout


def _apt_get_install(rootfs: Path, packages: tuple[str, ...], log_path: Path) -> None:
    """Run ``apt-get install packages`` in a chroot of ``rootfs`` with /proc mounted.

    The chroot gets the host's resolv.conf for the download and a policy-rc.d
    that keeps package scripts from starting services. Both are removed after.
    """
    policy = rootfs / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    resolv_conf = rootfs / "etc/resolv.conf"
    resolv_conf.unlink(missing_ok=True)
    resolv_conf.write_bytes(Path("/etc/resolv.conf").read_bytes())
    proc = rootfs / "proc"
    _run(["mount", "-t", "proc", "proc", str(proc)])
    env = "DEBIAN_FRONTEND=noninteractive"
    try:
        _run(["chroot", str(rootfs), "env", env, "apt-get", "update"])
        _run(
            ["chroot", str(rootfs), "env", env, "apt-get", "install", "-y",
             "--no-install-recommends", *packages],
            log_path=log_path,
        )
        _run(["chroot", str(rootfs), "apt-get", "clean"])
    finally:
        subprocess.run(["umount", str(proc)], check=False)
        policy.unlink(missing_ok=True)

BUILDERS = {"python3": debootstrap_image, "tools": tools_image, "fat": fat_image}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.images",
        description="Build (or reuse) cached test images and print LAYOUT_DIR:TAG for each.")
    # No choices= here: argparse 3.11 checks an empty list against them and fails.
    parser.add_argument("names", nargs="*", metavar="IMAGE",
                        help=f"images to build, of {', '.join(sorted(BUILDERS))} "
                             "(default: python3 and tools, the images the tests use)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BUILDERS]
    if unknown:
        parser.error(f"unknown image {unknown[0]!r}: expected one of {', '.join(sorted(BUILDERS))}")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if os.geteuid() != 0:
        print("building the test image needs root (debootstrap and umoci)", file=sys.stderr)
        return 1
    for build in (BUILDERS[name] for name in args.names or ["python3", "tools"]):
        started = time.monotonic()
        try:
            layout_dir, tag = build()
        except ImageBuildError as error:
            print(error, file=sys.stderr)
            return 1
        size_bytes = sum(f.stat().st_size for f in layout_dir.rglob("*") if f.is_file())
        log.info(
            "image ready after %.0f s, %.1f MB", time.monotonic() - started, size_bytes / 1e6
        )
        print(f"{layout_dir}:{tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
