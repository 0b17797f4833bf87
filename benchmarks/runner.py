"""The command-line frame that benchmarks share: logging, a work directory, the report.

``run_benchmark`` sets up logging, checks a requirement, creates a temporary
work directory under ``--work-dir``, calls the benchmark's ``measure``, removes
the work directory, prints the report and, with ``--write-results``, writes
it into its section of the results file. Options come from
``results_file.add_output_arguments``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lazyfs.errors import LazyfsError

from .bootlib import exit_on_sigterm, remove_tree
from .machine import describe_machine
from .results_file import replace_section

# measure(work directory) returns format(machine, total seconds) -> report.
Formatter = Callable[[list[tuple[str, str]], float], str]


def machine_lines(machine: list[tuple[str, str]]) -> list[str]:
    """Return the report's Markdown lines that describe the machine."""
    return ["Machine:", "", *[f"- {label}: {value}" for label, value in machine]]


def run_benchmark(name: str, args: argparse.Namespace, section_heading: str,
                  measure: Callable[[Path], Formatter], problem: str | None = None) -> int:
    """Run one benchmark from its parsed arguments; return the exit status.

    ``problem`` is the reason the benchmark cannot run here (exit status 2). A
    RuntimeError or LazyfsError from ``measure`` is printed as one line (exit
    status 1).
    """
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(levelname)s: %(message)s")
    if problem is not None:
        print(f"{name}: error: {problem}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"lazyfs-{name}-", dir=args.work_dir))
    # lazyfs-run maps the container's root to an unprivileged host uid, which
    # must reach the container state directories below.
    work.chmod(0o711)
    try:
        format_report = measure(work)
    except (RuntimeError, LazyfsError) as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 1
    finally:
        remove_tree(work)
    report = format_report(describe_machine(args.work_dir), time.monotonic() - started)
    print(report, end="")
    if args.write_results:
        replace_section(args.results_file, section_heading, report)
    return 0
