"""Run every daemon speed benchmark of the fat image in one command.

In turn: ``boot_fat`` (boot in every tier state, under store latency and eight
at once, against pull + unpack and a local rootfs), ``read_throughput`` (1 GiB
sequential and 4 KiB random reads against squashfuse, ext4 and boto3),
``metadata --image fat`` (lstat of every entry, attach time, daemon memory) and
``fuse_requests`` (the cost of one FUSE request against a minimal pyfuse3 file
system). Each one writes its own section of the results file with
``--write-results``. The fat image must be built first
(``python -m tests.support.images fat``). About 8 minutes on 2 cores. Run it
from the repository root, as root::

    .venv/bin/python -m benchmarks.daemon_speed --write-results
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

# (module, its arguments) in the order they run.
BENCHMARKS = (
    ("benchmarks.boot_fat", ["--runs", "3"]),
    ("benchmarks.read_throughput", ["--runs", "3"]),
    ("benchmarks.metadata", ["--image", "fat", "--runs", "3"]),
    ("benchmarks.fuse_requests", ["--runs", "5"]),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.daemon_speed",
                                     description="Run the daemon speed benchmarks of the fat image in turn.")
    parser.add_argument("--write-results", action="store_true",
                        help="let each benchmark write its section of benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    started = time.monotonic()
    for module, arguments in BENCHMARKS:
        command = [sys.executable, "-m", module, *arguments]
        if args.write_results:
            command.append("--write-results")
        print(f"== {' '.join(command[1:])}", flush=True)
        code = subprocess.run(command, check=False).returncode
        if code != 0:
            print(f"daemon_speed: error: {module} failed with exit status {code}", file=sys.stderr)
            return code
    print(f"== all benchmarks ran in {(time.monotonic() - started) / 60:.1f} minutes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
