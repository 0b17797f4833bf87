"""The OCI runtime spec (runc's config.json) for a container over an image tree.

The defaults follow what users get from Docker: its default capability set for
root, a private PID, IPC, UTS, mount and network namespace, masked kernel
interfaces and a read-only /sys. Devices come from runc's default allow list.

With an ``IdRange`` the container gets a user namespace too, with uidMappings
and gidMappings from container id 0 to the range's host bases. runc 1.1 then
bind-mounts its default devices (/dev/null, /dev/zero, ...) from the host
instead of creating them with mknod(2), which a user namespace forbids, and it
can mount sysfs only because the container has its own network namespace.
"""

from __future__ import annotations

import resource
from pathlib import Path

from .imageuser import ProcessUser
from .userns import IdRange

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Docker's default capabilities; a process of a non-root user loses them on exec.
DEFAULT_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
    "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]

_MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware",
]

_READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def _mounts() -> list[dict]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ]


def merge_env(image_env: list[str], overrides: list[str], user: ProcessUser) -> list[str]:
    """Merge image and command-line variables; later values win, order is kept."""
    merged: dict[str, str] = {}
    for item in list(image_env) + list(overrides):
        name, _, value = item.partition("=")
        merged[name] = value
    merged.setdefault("PATH", DEFAULT_PATH)
    merged.setdefault("HOME", user.home)
    return [f"{name}={value}" for name, value in merged.items()]


def runtime_spec(rootfs: Path, args: list[str], env: list[str], cwd: str, user: ProcessUser,
                 hostname: str, terminal: bool = False, id_range: IdRange | None = None) -> dict:
    """Return a runc config for running ``args`` in ``rootfs``, in a user namespace with ``id_range``."""
    # As many open files as this host allows, up to Docker's default of 1048576.
    nofile = min(1048576, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    # The bounding set stays for every user so setuid programs in the image work.
    effective = DEFAULT_CAPABILITIES if user.uid == 0 else []
    namespaces = ["pid", "network", "ipc", "uts", "mount"]
    linux: dict = {}
    if id_range is not None:
        namespaces.append("user")
        linux.update(id_range.mappings())
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": user.uid, "gid": user.gid,
                     **({"additionalGids": list(user.additional_gids)} if user.additional_gids else {})},
            "args": args,
            "env": env,
            "cwd": cwd or "/",
            "capabilities": {"bounding": list(DEFAULT_CAPABILITIES),
                             "effective": list(effective), "permitted": list(effective)},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": False,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": hostname,
        "mounts": _mounts(),
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": kind} for kind in namespaces],
            "maskedPaths": _MASKED_PATHS,
            "readonlyPaths": _READONLY_PATHS,
            **linux,
        },
    }
